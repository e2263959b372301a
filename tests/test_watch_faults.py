"""Watcher fault tests (issue 14): slow non-atomic copies, two watchers on one dir, a checkpoint deleted during its
evaluation, SIGTERM/SIGKILL again and again, and a real `mlflow server` killed mid-watch and restarted.

Every scenario ends with MLflow read back by a plain MlflowClient: each checkpoint FINISHED exactly once, with the
identity of its final files, and no run left RUNNING. Waiting is on conditions (log lines, MLflow rows) with
timeouts; the only sleeps are the pauses that make a copy slow, which is the scenario itself.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ckpteval.checkpoint import checkpoint_identity
from tests import factories
from tests.test_watch import SEQ, WatcherProcess, _copy, _dcp_dir

pytestmark = pytest.mark.slow

FAST = ["watch.interval=0.3", "watch.stable_s=0.5", "watch.backoff_s=0.2", "watch.heartbeat_s=0.5",
        "watch.lock_stale_s=30"]
PAUSE = 1.2  # between files of a slow copy: longer than watch.stable_s, so stability alone cannot protect


@pytest.fixture(scope="module")
def templates(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("templates")
    hf = {seed: factories.make_hf_checkpoint(root / f"seed{seed}", tiny_tokenizer_dir, seed=seed) for seed in (1, 2)}
    dcp = _dcp_dir(root / "dcp", seed=3)  # a trainer's DCP dir: weights only, config.json copied in last
    shutil.copy(hf[1] / "config.json", root / "dcp_config.json")
    return {**hf, "dcp": dcp, "dcp_config": root / "dcp_config.json"}


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    return factories.make_token_shards(tmp_path_factory.mktemp("val"), lengths=(3000, 2000), seed=5)


def _args(ckpts: Path, val_shards: Path, uri: str, *extra: str) -> list[str]:
    return ["mode=watch", f"watch.dir={ckpts}", "data=local", f"data.dataset_path={val_shards}",
            f"eval.seq_len={SEQ}", "eval.batch_size=8", "eval.steps=-1", f"tracking.uri={uri}", *FAST, *extra]


def _runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]  # one experiment per training run
    if not ids:
        return []
    runs = client.search_runs(ids, max_results=5000)
    return [r for r in runs if r.data.tags.get("mode") == "watch" and r.data.tags.get("evaluation") != "watcher"]


def _wait(condition, timeout: float, what: str, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)  # polling interval of a condition wait, not synchronisation by sleeping
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _finished_by_step(uri: str) -> dict[int, list]:
    out: dict[int, list] = {}
    for r in _runs(uri):
        if r.info.status == "FINISHED":
            out.setdefault(int(r.data.tags["step"]), []).append(r)
    return out


def _assert_exactly_once(uri: str, ckpts: Path, steps: list[int]) -> None:
    runs = _runs(uri)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"], "runs left RUNNING"
    finished = _finished_by_step(uri)
    assert sorted(finished) == sorted(steps), sorted(finished)
    for step, rs in finished.items():
        assert len(rs) == 1, f"step {step}: {len(rs)} FINISHED runs"
        path = next(p for p in ckpts.iterdir() if p.name.startswith(f"step_{step}"))
        assert rs[0].data.tags["ckpt_identity"] == checkpoint_identity(path), f"step {step} evaluated half-written"


def _copy_slowly(src: Path, dst: Path, order: list[str], pause: float, chunks: int = 3) -> None:
    """A non-atomic copy in `order`, one file at a time, pausing `pause` s between files, and files over 4 KiB in
    `chunks` pieces with the same pause between pieces."""
    dst.mkdir(exist_ok=True)
    for name in order:
        data = (src / name).read_bytes()
        with open(dst / name, "wb") as f:
            piece = len(data) // chunks + 1 if len(data) > 4096 else len(data) or 1
            for i in range(0, len(data), piece):
                f.write(data[i:i + piece])
                f.flush()
                time.sleep(pause)


def test_slow_non_atomic_copies_are_never_evaluated_half_written(tmp_path, templates, val_shards):
    """HF dir copied file by file (weights in pieces, config.json last) and a DCP dir whose `.metadata` arrives
    first and config.json last, with pauses longer than watch.stable_s: each evaluated once, whole."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    hf = templates[1]
    hf_order = sorted(p.name for p in hf.iterdir() if p.name != "config.json") + ["config.json"]
    dcp = templates["dcp"]
    dcp_order = [".metadata"] + sorted(p.name for p in dcp.iterdir() if p.name != ".metadata")
    w = WatcherProcess(_args(ckpts, val_shards, uri), tmp_path)
    try:
        w.wait_for(r"watching ")
        # Each stage of the copy waits until the watcher has said it saw the half-written state before it goes on
        # (pauses alone race a watcher slowed down by a loaded machine: it could look only once a copy is whole).
        seen = [threading.Event() for _ in range(3)]

        def copy_in_stages():
            _copy_slowly(hf, ckpts / "step_100", hf_order[:-1], PAUSE)
            seen[0].wait(120)
            _copy_slowly(hf, ckpts / "step_100", hf_order[-1:], PAUSE)  # config.json last
            _copy_slowly(dcp, ckpts / "step_200", dcp_order[:1], PAUSE)  # .metadata first
            seen[1].wait(120)
            _copy_slowly(dcp, ckpts / "step_200", dcp_order[1:], PAUSE)
            seen[2].wait(120)
            shutil.copy(templates["dcp_config"], ckpts / "step_200" / "config.json")

        copier = threading.Thread(target=copy_in_stages)
        copier.start()
        for event, pattern in zip(seen, (r"waiting for .*step_100 .*(truncated|`model` group)",
                                         r"waiting for .*step_200 .*\.metadata names",
                                         r"waiting for .*step_200 .*`model` group"), strict=True):
            w.wait_for(pattern, timeout=120)
            event.set()
        copier.join(timeout=120)
        assert not copier.is_alive()
        w.wait_for(r"done loss on .*step_100 ", timeout=180)
        w.wait_for(r"done loss on .*step_200 ", timeout=180)
        w.proc.send_signal(signal.SIGTERM)
        assert w.finish() == 0, w.output[-3000:]
    finally:
        w.kill()
    _assert_exactly_once(uri, ckpts, [100, 200])
    assert not [r for r in _runs(uri) if r.info.status != "FINISHED"], "a half-written copy was attempted"
    waits = [line for line in w.lines if re.search(r"waiting for .*step_100 ", line)]
    assert len(waits) <= 3, waits  # one line per state (truncated, no config), not one per poll


def test_two_watchers_on_one_dir_with_different_state_dirs(tmp_path, templates, val_shards):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for step, seed in ((100, 1), (200, 2), (300, 1)):
        _copy(templates[seed], ckpts / f"step_{step}")
    a = WatcherProcess(_args(ckpts, val_shards, uri, f"watch.state_dir={tmp_path / 'state_a'}"), tmp_path)
    a.wait_for(r"heartbeat: ")  # two processes creating one new sqlite store at once race in MLflow's migrations
    b = WatcherProcess(_args(ckpts, val_shards, uri, f"watch.state_dir={tmp_path / 'state_b'}"), tmp_path)
    try:
        _wait(lambda: len(_finished_by_step(uri)) == 3, 300, "three FINISHED runs")
        _copy(templates[2], ckpts / "step_400")  # arrives while both still watch
        _wait(lambda: len(_finished_by_step(uri)) == 4, 180, "four FINISHED runs")
        for w in (a, b):
            w.proc.send_signal(signal.SIGTERM)
        assert a.finish() == 0 and b.finish() == 0, a.output[-2000:] + b.output[-2000:]
    finally:
        a.kill()
        b.kill()
    _assert_exactly_once(uri, ckpts, [100, 200, 300, 400])
    standby = [w for w in (a, b) if "another watcher" in w.output]
    assert len(standby) == 1, "exactly one of the two stood by"


def test_checkpoint_deleted_during_its_evaluation_is_recorded_skipped(tmp_path, templates, val_shards,
                                                                      monkeypatch):
    """Deleted after the evaluation started (its weights vanish under the loader): recorded skipped, no retry,
    and the checkpoint next to it is evaluated normally."""
    from ckpteval import app
    from ckpteval.modes import loss as loss_mode
    from ckpteval.watch.ledger import SKIPPED, Ledger

    monkeypatch.chdir(tmp_path)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _copy(templates[1], ckpts / "step_100")
    _copy(templates[2], ckpts / "step_200")
    real = loss_mode.evaluate_checkpoint_loss

    def delete_then_evaluate(cfg, job, path):
        if Path(path).name == "step_100":
            shutil.rmtree(path)  # the trainer's retention policy removes it as the evaluation starts
        return real(cfg, job, path)

    monkeypatch.setattr(loss_mode, "evaluate_checkpoint_loss", delete_then_evaluate)
    summary = app.main(factories.compose(_args(ckpts, val_shards, uri, "watch.once=true", "watch.max_attempts=3")))
    assert summary["watch/evaluated"] == 1 and summary["watch/failed"] == 0 and summary["watch/retries"] == 0
    runs = _runs(uri)
    assert not [r for r in runs if "retry" in r.data.tags.get("watch_result", "")]
    assert [r.info.status for r in runs if r.data.tags["step"] == "200"] == ["FINISHED"]
    deleted = [r for r in runs if r.data.tags["step"] == "100"]
    assert len(deleted) == 1 and deleted[0].info.status != "RUNNING"
    assert deleted[0].data.tags["watch_result"].startswith("skipped")
    entries = Ledger(ckpts / ".ckpteval_watch").entries.values()
    assert [e["status"] for e in entries if e["step"] == 100] == [SKIPPED]


def test_sigterm_and_sigkill_mid_watch_repeatedly(tmp_path, templates, val_shards):
    """Real `run.py mode=watch` processes signalled at random points, again and again, while checkpoints keep
    arriving; a final `watch.once=true` run finishes the backlog: every checkpoint FINISHED once, none RUNNING."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rng = random.Random(14)
    args = _args(ckpts, val_shards, uri, "watch.max_attempts=20", "eval.batch_size=2")
    steps = []
    for round_ in range(6):
        step = 100 * (round_ + 1)
        _copy(templates[1 + round_ % 2], ckpts / f"step_{step}")
        steps.append(step)
        w = WatcherProcess(args, tmp_path)
        try:
            w.wait_for(r"started loss on|backlog done|heartbeat", timeout=120)
            sig = (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGHUP)[round_ % 4]
            time.sleep(rng.uniform(0, 1.5))  # a random point inside the evaluation: the scenario, not a sync
            w.proc.send_signal(sig)
            rc = w.finish(timeout=60)
            assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 0), w.output[-2000:]
        finally:
            w.kill()
    final = WatcherProcess(args + ["watch.once=true"], tmp_path)
    try:
        assert final.finish(timeout=400) == 0, final.output[-3000:]
    finally:
        final.kill()
    _assert_exactly_once(uri, ckpts, steps)


# ---------------------------------------------------------------------------------------------- mlflow server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with an sqlite backend in tmp; start() waits for /health."""

    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        import urllib.request

        mlflow_bin = Path(sys.executable).with_name("mlflow")
        with open(self.root / "server.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
                 "--artifacts-destination", str(self.root / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                return urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200
            except OSError:
                return False

        _wait(healthy, timeout, "mlflow server /health")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its workers
            self.proc.wait()
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.kill()


def test_tracking_server_killed_mid_watch_and_restarted(tmp_path, templates, val_shards, mlflow_server):
    """The server dies while an evaluation runs and comes back later: that evaluation's attempt is not burnt,
    its results reach MLflow once (outbox replay), nothing is evaluated twice and nothing stays RUNNING."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    uri = mlflow_server.uri
    _copy(templates[1], ckpts / "step_100")
    w = WatcherProcess(_args(ckpts, val_shards, uri, "eval.batch_size=1", "watch.max_attempts=2",
                             "tracking.timeout_s=5"), tmp_path)
    try:
        w.wait_for(r"done loss on .*step_100 ", timeout=180)
        _copy(templates[2], ckpts / "step_200")
        w.wait_for(r"evaluating .*step_200 ", timeout=120)
        mlflow_server.kill()  # mid-evaluation (its run is open: the line above is logged inside it)
        _copy(templates[1], ckpts / "step_300")  # arrives during the outage
        w.wait_for(r"step_200 .*tracking store (went away|failed)|tracking store failed during loss on .*step_200", timeout=180)
        mlflow_server.start()
        _wait(lambda: len(_finished_by_step(uri)) == 3, 300, "three FINISHED runs after the server returned")
        w.proc.send_signal(signal.SIGTERM)
        assert w.finish() == 0, w.output[-3000:]
    finally:
        w.kill()
        (tmp_path / "watcher.log").write_text(w.output)  # for a failure's post-mortem
    _assert_exactly_once(uri, ckpts, [100, 200, 300])
    assert "attempt 2/2" not in w.output  # the outage did not burn an attempt

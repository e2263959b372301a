"""Job lifecycle under faults: a real `mlflow server` killed mid-job, SIGTERM / SIGKILL mid-job and mid-scan.

Every run ends in a true final state: FINISHED only with complete results, KILLED when stopped, and a run whose
process died (SIGKILL) or whose store went away is ended on the next start. Results of a finished evaluation
wait in the outbox while the store is away and are replayed once (never twice) when it is back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ckpteval import app
from tests import factories

pytestmark = pytest.mark.slow
SEQ = 16


# ---------------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(condition, timeout: float, what: str, step: float = 0.1):
    """Poll `condition()` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)  # polling interval of a condition wait, not a synchronisation sleep
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<free port> with an sqlite backend in tmp; restartable on the same port."""

    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root}/server.db", "--workers", "1",
               "--default-artifact-root", (self.root / "artifacts").as_uri(), "--no-serve-artifacts"]
        with open(self.root / "server.log", "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(self.healthy, 120, f"mlflow server on {self.url} (log: {self.root / 'server.log'})", 0.25)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
        _wait(lambda: not self.healthy(), 30, "the server to stop answering")

    def runs(self):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.url)
        ids = [e.experiment_id for e in client.search_experiments()]  # one experiment per training run
        return client, (client.search_runs(ids, max_results=100) if ids else [])


@pytest.fixture()
def server(tmp_path):
    srv = MlflowServer(tmp_path)
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _loss_args(ckpt, shards, *extra) -> list[str]:
    return ["mode=loss", f"ckpt={ckpt}", "data=local", f"data.dataset_path={shards}", f"eval.seq_len={SEQ}",
            "eval.batch_size=2", *extra]


# ---------------------------------------------------------------------------------------------- server outage


def test_server_killed_mid_job_results_wait_in_outbox_and_are_replayed_once(in_tmp, server, tiny_hf_ckpt,
                                                                            tiny_token_shards, capsys, monkeypatch):
    from ckpteval.modes import loss as loss_mode
    from ckpteval.tracking import replay_outbox

    real = loss_mode.evaluate_checkpoint_loss

    def evaluate_then_lose_the_server(cfg, job, ckpt, **kwargs):
        result = real(cfg, job, ckpt, **kwargs)
        server.kill()  # mid-job: the run is open, the evaluation done, nothing of it logged yet
        return result

    monkeypatch.setattr(loss_mode, "evaluate_checkpoint_loss", evaluate_then_lose_the_server)
    run_dir = in_tmp / "run"
    cfg = factories.compose(_loss_args(tiny_hf_ckpt, tiny_token_shards, "eval.steps=2", f"tracking.uri={server.url}",
                                       "tracking.timeout_s=2", f"paths.outputs={in_tmp}/outputs",
                                       f"hydra.run.dir={run_dir}"))
    with pytest.raises(SystemExit) as exc:
        app.main(cfg)
    assert exc.value.code == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "outbox" in err[0] and "mode=replay" in err[0], err
    assert not (in_tmp / "results.json").exists()  # not tracked yet: no results.json
    outbox = in_tmp / "outputs" / "tracking_outbox"
    pending = list((outbox / "pending").glob("*.json"))
    assert len(pending) == 1
    run_id = pending[0].stem

    assert replay_outbox(cfg.tracking) == 0  # still down: kept
    server.start()
    assert replay_outbox(cfg.tracking) == 1
    client, runs = server.runs()
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    saved = json.loads((in_tmp / "results.json").read_text())
    history = client.get_metric_history(run_id, "eval/loss")
    assert [(m.step, m.value) for m in history] == [(120, pytest.approx(saved["eval/loss"]))]
    assert "results.json" in {a.path for a in client.list_artifacts(run_id)}
    # exactly once: a second replay finds nothing; the record of what was replayed stays
    assert replay_outbox(cfg.tracking) == 0
    assert len(client.get_metric_history(run_id, "eval/loss")) == 1
    assert (outbox / "replayed" / f"{run_id}.json").exists() and not pending[0].exists()


def test_job_whose_server_died_says_so_and_replay_command_delivers(tmp_path, server, tiny_hf_ckpt):
    """CLI: the server dies while a long evaluation runs; the job says so in one line, exits 3; after a restart
    `python run.py mode=replay` delivers the run FINISHED."""
    shards = factories.make_token_shards(tmp_path / "shards", lengths=(60_000,))
    args = _loss_args(tiny_hf_ckpt, shards, "eval.steps=-1", f"tracking.uri={server.url}", "tracking.timeout_s=2",
                      f"paths.outputs={tmp_path}/outputs", f"hydra.run.dir={tmp_path}/run")
    proc, lines = _start_cli(args, tmp_path)
    _wait(lambda: any("evaluating" in line for line in lines), 180, "the evaluation to start")
    server.kill()
    _, err = _finish(proc, lines)
    assert proc.returncode == 3, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "outbox" in errors[0] and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "run" / "results.json").exists()
    server.start()
    replay = factories.run_cli(["mode=replay", f"tracking.uri={server.url}", f"paths.outputs={tmp_path}/outputs"],
                               cwd=tmp_path, timeout=180)
    assert replay.returncode == 0 and "replay: 1 run(s) completed" in replay.stdout, replay.stderr[-3000:]
    _, runs = server.runs()
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert (tmp_path / "run" / "results.json").exists()


# ---------------------------------------------------------------------------------------------- signals


def _start_cli(args: list[str], cwd: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(factories.REPO / "run.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    proc.reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    proc.reader.start()
    return proc, lines


def _finish(proc, lines, timeout: float = 300) -> tuple[str, str]:
    proc.wait(timeout=timeout)
    proc.reader.join(timeout=30)  # all output read (the pipe closes when the process is gone)
    text = "".join(lines)
    return text, text


def _statuses(db: Path) -> list[str]:
    _, runs = factories.mlflow_runs(db)
    return sorted(r.info.status for r in runs)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_mid_job_ends_the_run_killed(tmp_path, tiny_hf_ckpt, sig):
    shards = factories.make_token_shards(tmp_path / "shards", lengths=(2_000_000,))
    db = tmp_path / "mlflow.db"
    proc, lines = _start_cli(_loss_args(tiny_hf_ckpt, shards, "eval.steps=-1", f"tracking.uri=sqlite:///{db}",
                                        f"hydra.run.dir={tmp_path}/run"), tmp_path)
    _wait(lambda: any("evaluating" in line for line in lines), 180, "the evaluation to start")
    proc.send_signal(sig)
    text, _ = _finish(proc, lines, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in text, text[-3000:]
    assert _statuses(db) == ["KILLED"], text[-3000:]
    assert not (tmp_path / "run" / "results.json").exists(), text[-3000:]
    assert not list((tmp_path / "outputs" / "tracking_outbox" / "running").glob("*.json")), text[-3000:]


def test_sigkill_mid_job_run_is_ended_on_the_next_start(tmp_path, tiny_hf_ckpt, tiny_token_shards, monkeypatch):
    shards = factories.make_token_shards(tmp_path / "shards", lengths=(2_000_000,))
    db = tmp_path / "mlflow.db"
    proc, lines = _start_cli(_loss_args(tiny_hf_ckpt, shards, "eval.steps=-1", f"tracking.uri=sqlite:///{db}",
                                        f"paths.outputs={tmp_path}/outputs", f"hydra.run.dir={tmp_path}/run"),
                             tmp_path)
    _wait(lambda: any("evaluating" in line for line in lines), 180, "the evaluation to start")
    proc.kill()
    proc.wait(timeout=60)
    assert _statuses(db) == ["RUNNING"]  # nothing could end it: the process had no chance
    monkeypatch.chdir(tmp_path)
    cfg = factories.compose(_loss_args(tiny_hf_ckpt, tiny_token_shards, "eval.steps=1", f"tracking.uri=sqlite:///{db}",
                                       f"paths.outputs={tmp_path}/outputs", f"hydra.run.dir={tmp_path}/next"))
    app.main(cfg)  # the next start ends the orphan before it opens its own run
    assert _statuses(db) == ["FINISHED", "KILLED"]


def test_sigterm_mid_scan_ends_job_and_parent_killed(tmp_path, tiny_tokenizer_dir):
    ckpts = tmp_path / "ckpts"
    for step in (10, 20):
        factories.make_hf_checkpoint(ckpts / f"step_{step}", tiny_tokenizer_dir, seed=step)
    shards = factories.make_token_shards(tmp_path / "shards", lengths=(2_000_000,))
    db = tmp_path / "mlflow.db"
    args = ["-m", *_loss_args(f"glob:{ckpts}/step_*", shards, "eval.steps=-1", f"tracking.uri=sqlite:///{db}",
                              f"hydra.sweep.dir={tmp_path}/sweep")]
    proc, lines = _start_cli(args, tmp_path)
    _wait(lambda: any("evaluating" in line for line in lines), 240, "the first job's evaluation to start")
    proc.send_signal(signal.SIGTERM)
    text, _ = _finish(proc, lines, timeout=120)
    assert proc.returncode != 0, text[-3000:]
    _, runs = factories.mlflow_runs(db)
    by_kind = {("parent" if r.data.tags.get("ckpteval.sweep") else "job"): r.info.status for r in runs}
    assert by_kind == {"parent": "KILLED", "job": "KILLED"}, [(r.data.tags.get("mlflow.runName"), r.info.status)
                                                              for r in runs]
    assert len(runs) == 2  # the second checkpoint never started


def test_sigkill_mid_scan_parent_and_job_are_ended_on_the_next_start(tmp_path, tiny_tokenizer_dir, tiny_token_shards,
                                                                      monkeypatch):
    """SIGKILL mid-scan: nothing in the process can end its runs, so the scan's parent and its job stay RUNNING
    until the next start on the same store ends both KILLED."""
    ckpts = tmp_path / "ckpts"
    for step in (10, 20):
        factories.make_hf_checkpoint(ckpts / f"step_{step}", tiny_tokenizer_dir, seed=step)
    shards = factories.make_token_shards(tmp_path / "shards", lengths=(2_000_000,))
    db = tmp_path / "mlflow.db"
    outputs = f"paths.outputs={tmp_path}/outputs"
    args = ["-m", *_loss_args(f"glob:{ckpts}/step_*", shards, "eval.steps=-1", f"tracking.uri=sqlite:///{db}",
                              outputs, f"hydra.sweep.dir={tmp_path}/sweep")]
    proc, lines = _start_cli(args, tmp_path)
    _wait(lambda: any("evaluating" in line for line in lines), 240, "the first job's evaluation to start")
    proc.kill()
    proc.wait(timeout=60)
    _, runs = factories.mlflow_runs(db)
    assert sorted(r.info.status for r in runs) == ["RUNNING", "RUNNING"]  # parent + the job under way
    monkeypatch.chdir(tmp_path)
    app.main(factories.compose(_loss_args(ckpts / "step_10", tiny_token_shards, "eval.steps=1",
                                          f"tracking.uri=sqlite:///{db}", outputs, f"hydra.run.dir={tmp_path}/next")))
    _, runs = factories.mlflow_runs(db)
    by_kind = sorted(("parent" if r.data.tags.get("ckpteval.sweep") else "job", r.info.status) for r in runs)
    assert by_kind == [("job", "FINISHED"), ("job", "KILLED"), ("parent", "KILLED")], by_kind


def test_stop_swallowed_in_a_weakref_callback_is_raised_again():
    """SIGTERM while Python runs a weakref callback: Python swallows the JobStopped raised there; the runner sends
    the signal again, so the stop still reaches the job's own code (and its run ends KILLED, not RUNNING)."""
    import signal
    import time
    import weakref

    from ckpteval.job import JobStopped, stop_signals

    class Held:
        pass

    with pytest.raises(JobStopped, match="SIGTERM"):
        with stop_signals():
            obj = Held()
            ref = weakref.ref(obj, lambda _: signal.raise_signal(signal.SIGTERM))  # noqa: F841 - keeps the callback
            del obj  # the callback runs here; the JobStopped raised inside it is swallowed by Python
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the job's own code: the re-sent signal must stop it
                time.sleep(0.01)

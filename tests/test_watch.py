"""`mode=watch`: exactly-once evaluation of a directory a simulated trainer fills, across SIGKILL and SIGTERM.

The end-to-end test runs the real CLI in subprocesses and reads MLflow back with a plain MlflowClient; loss
values are checked against the plain transformers reference. Unit tests cover the plan (heavy cadence), the
ledger, the lock, and discovery (stability, remote fsspec stores).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ckpteval import app
from ckpteval.checkpoint import checkpoint_identity
from ckpteval.errors import CkptEvalError
from ckpteval.watch.discovery import INCOMPLETE, NO_FALLBACK, READY, UNSTABLE, Discovery
from ckpteval.watch.ledger import DONE, SKIPPED, Ledger, WatchLock
from ckpteval.watch.plan import harness_config, plan_evaluations, validate_plan
from tests import factories

SEQ = 32
FAST = ["watch.interval=0.3", "watch.stable_s=0.5", "watch.backoff_s=0.2", "watch.max_attempts=2",
        "watch.heartbeat_s=1", "watch.lock_stale_s=30"]


@pytest.fixture(scope="module")
def templates(tmp_path_factory, tiny_tokenizer_dir):
    """Three tiny HF checkpoints with different weights (so their losses differ) to copy into the watched dir."""
    root = tmp_path_factory.mktemp("templates")
    return {seed: factories.make_hf_checkpoint(root / f"seed{seed}", tiny_tokenizer_dir, seed=seed) for seed in (1, 2, 3)}


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    return factories.make_token_shards(tmp_path_factory.mktemp("val"), lengths=(4000, 3000), seed=5)


def _reference(ckpt: Path, shards: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return factories.reference_loss(model, [np.fromfile(f, dtype=np.uint16) for f in sorted(shards.glob("*.bin"))],
                                    SEQ)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------- plan


def _watch_cfg(**kw):
    cfg = factories.compose(["mode=watch", *[f"watch.{k}={v}" for k, v in kw.items()]])
    return cfg


def test_heavy_cadence_is_deterministic_whatever_the_arrival_order():
    cfg = _watch_cfg(**{"plan": "[loss,harness]", "heavy.tasks": "[mmlu]", "heavy.num_fewshot": 5,
                        "heavy.every_n_steps": 4000, "heavy.limit": 0.5})
    validate_plan(cfg.watch)
    steps = list(range(0, 20001, 1000)) + [3999, 4001, 12345]
    expected = {s: ["loss", "harness"] + (["heavy"] if s % 4000 == 0 else []) for s in steps}
    for seed in range(3):
        order = steps[:]
        random.Random(seed).shuffle(order)
        assert {s: [e.name for e in plan_evaluations(s, cfg.watch)] for s in order} == expected
    assert [s for s in steps if "heavy" in expected[s]] == [0, 4000, 8000, 12000, 16000, 20000]
    assert [e.name for e in plan_evaluations(None, cfg.watch)] == ["loss", "harness"]  # unknown step: never heavy

    heavy = plan_evaluations(8000, cfg.watch)[-1]
    assert heavy.kind == "harness"
    merged = harness_config(cfg, heavy)  # heavy settings over cfg.harness; the rest of cfg.harness kept
    assert list(merged.tasks) == ["mmlu"] and merged.num_fewshot == 5 and merged.limit == 0.5
    assert merged.batch_size == cfg.harness.batch_size and merged.backend == cfg.harness.backend
    assert harness_config(cfg, plan_evaluations(8000, cfg.watch)[0]) is None  # loss/harness: cfg.harness as is


@pytest.mark.parametrize("kw, message", [
    ({"plan": "[loss,loss]"}, "twice"),
    ({"heavy.every_n_steps": 100}, "heavy.tasks is empty"),
    ({"plan": "[]"}, "nothing to evaluate"),
])
def test_plan_validation(kw, message):
    with pytest.raises(CkptEvalError, match=message):
        validate_plan(_watch_cfg(**kw).watch)


# ---------------------------------------------------------------------------------------------- ledger + lock


def test_ledger_is_atomic_and_survives_a_crash_mid_write(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path)
    ledger.record("abc", "loss", DONE, run_id="r1", step=100)
    assert Ledger(tmp_path).status("abc", "loss") == DONE
    before = (tmp_path / "ledger.json").read_text()

    def crash(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ledger.record("def", "loss", DONE)
    monkeypatch.undo()
    assert (tmp_path / "ledger.json").read_text() == before  # the old ledger, whole
    assert Ledger(tmp_path).status("def", "loss") is None
    ledger.restore("abc", "loss", None)
    assert Ledger(tmp_path).status("abc", "loss") is None
    (tmp_path / "ledger.json").write_text("{torn")
    with pytest.raises(CkptEvalError, match="unreadable"):
        Ledger(tmp_path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_single_holder_heartbeat_and_stale_recovery(tmp_path):
    a = WatchLock(tmp_path, stale_s=30, heartbeat_s=0.05)
    b = WatchLock(tmp_path, stale_s=30, heartbeat_s=0.05)
    assert a.acquire()
    assert not b.acquire()  # live holder (this pid)
    first = a.read()["heartbeat"]
    time.sleep(0.3)
    assert a.read()["heartbeat"] > first  # the heartbeat thread refreshes it
    a.release()
    assert not (tmp_path / "lock.json").exists()
    assert b.acquire()
    b.release()

    # A holder that died on this host (SIGKILL, OOM): taken over at once.
    (tmp_path / "lock.json").write_text(json.dumps({"pid": _dead_pid(), "host": b.host, "token": "x",
                                                    "heartbeat": time.time()}))
    assert b.acquire() and b.read()["token"] == b.token
    b.release()

    # A holder on another host whose heartbeat is older than lock_stale_s: taken over; fresh: not.
    other = {"pid": 1, "host": "elsewhere", "token": "y"}
    (tmp_path / "lock.json").write_text(json.dumps({**other, "heartbeat": time.time()}))
    assert not b.acquire()
    (tmp_path / "lock.json").write_text(json.dumps({**other, "heartbeat": time.time() - 60}))
    assert b.acquire()

    # The displaced holder notices on its next heartbeat and stops.
    c = WatchLock(tmp_path, stale_s=0.01, heartbeat_s=10)
    time.sleep(0.05)
    b._stop.set()  # freeze b's heartbeat so it looks stale
    time.sleep(0.05)
    assert c.acquire()
    b.heartbeat()
    assert b.lost
    c.release()


# ---------------------------------------------------------------------------------------------- discovery


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_discovery_waits_for_complete_and_stable(tmp_path, templates):
    root = tmp_path / "ckpts"
    root.mkdir()
    _copy(templates[1], root / "step_100")
    _copy(templates[1], root / ".step_200.partial")  # an atomic saver's temp dir: never a candidate
    _copy(templates[1], root / "best_model")  # no step in the name: ignored
    (root / "config.json").write_text("{}")  # loose top-level files: ignored
    slow = root / "step_300"
    slow.mkdir()
    for f in templates[2].iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, slow / f.name)
    weights = (templates[2] / "model.safetensors").read_bytes()
    (slow / "model.safetensors").write_bytes(weights[: len(weights) // 2])

    clock = Clock()
    disc = Discovery(str(root), stable_s=2.0, clock=clock)
    states = {c.name: c.state for c in disc.look()}
    assert states == {"step_100": UNSTABLE, "step_300": INCOMPLETE}  # first look: nothing is stable yet
    clock.t += 2.5
    looked = {c.name: c for c in disc.look()}
    assert looked["step_100"].state == READY and looked["step_300"].state == INCOMPLETE
    assert looked["step_100"].identity == checkpoint_identity(root / "step_100")
    assert looked["step_100"].step == 100

    (slow / "model.safetensors").write_bytes(weights)  # finished: complete, but must stay still for stable_s
    assert {c.name: c.state for c in disc.look()}["step_300"] == UNSTABLE
    clock.t += 1.0
    (slow / "trainer_state.json").write_text("{}")  # still writing: the clock restarts
    assert {c.name: c.state for c in disc.look()}["step_300"] == UNSTABLE
    clock.t += 1.5
    assert {c.name: c.state for c in disc.look()}["step_300"] == UNSTABLE
    clock.t += 1.0
    ready = {c.name: c for c in disc.look()}["step_300"]
    assert ready.state == READY and ready.identity == checkpoint_identity(slow)


def test_discovery_of_a_remote_fsspec_store(templates):
    import fsspec

    fs = fsspec.filesystem("memory")
    base = "/watchtest_remote"
    fs.rm(base, recursive=True) if fs.exists(base) else None
    for f in templates[1].iterdir():
        fs.pipe(f"{base}/step_100/{f.name}", f.read_bytes())
    # a sharded checkpoint whose index names a shard that has not arrived yet
    fs.pipe(f"{base}/step_200/config.json", (templates[1] / "config.json").read_bytes())
    fs.pipe(f"{base}/step_200/model.safetensors.index.json",
            json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                       "b": "model-00002-of-00002.safetensors"}}).encode())
    fs.pipe(f"{base}/step_200/model-00001-of-00002.safetensors", (templates[1] / "model.safetensors").read_bytes())

    clock = Clock()
    disc = Discovery(f"memory://{base}", stable_s=1.0, clock=clock)
    disc.look()
    clock.t += 1.5
    looked = {c.name: c for c in disc.look()}
    assert looked["step_100"].state == READY and looked["step_100"].url == f"memory://{base}/step_100"
    assert looked["step_200"].state == INCOMPLETE and "model-00002-of-00002.safetensors" in looked["step_200"].reason

    downloads = Path(os.environ.get("TMPDIR", "/tmp")) / f"ckpteval_watch_dl_{os.getpid()}"
    with disc.local_copy(looked["step_100"], downloads) as path:
        assert sorted(p.name for p in Path(path).iterdir()) == sorted(p.name for p in templates[1].iterdir())
        assert (Path(path) / "model.safetensors").read_bytes() == (templates[1] / "model.safetensors").read_bytes()
    assert not (downloads / "step_100").exists()  # temporary downloads are removed
    fs.rm(base, recursive=True)


def _dcp_dir(dst: Path, seed: int) -> Path:
    import torch.distributed.checkpoint as dcp

    model = factories.make_model(seed=seed)
    dcp.save({"model": model.state_dict()}, storage_writer=dcp.FileSystemWriter(str(dst)))
    return dst


@pytest.mark.parametrize("store", ["memory", "file"])
def test_local_and_remote_listings_judge_completeness_the_same(tmp_path, templates, monkeypatch, store):
    """One definition of complete: the remote check (fsspec, headers only) agrees with check_complete on every
    half-written state: truncated safetensors, a shard short of what DCP .metadata names, a cut GGUF."""
    import fsspec

    from ckpteval.checkpoint import check_complete, listing

    local = tmp_path / "local"
    local.mkdir()
    weights = (templates[1] / "model.safetensors").read_bytes()
    cases = {}
    cases["step_1"] = _copy(templates[1], local / "step_1")
    cut = _copy(templates[1], local / "step_2")
    (cut / "model.safetensors").write_bytes(weights[: len(weights) - 100])
    dcp_dir = _dcp_dir(local / "step_3", seed=1)
    short = _copy(dcp_dir, local / "step_4")
    distcp = min(short.glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:-10])
    missing = _copy(dcp_dir, local / "step_5")
    for f in missing.glob("*.distcp"):
        f.unlink()
    gguf_bytes = factories.write_llama_gguf(factories.make_model(seed=2), tmp_path / "g.gguf").read_bytes()
    (local / "step_6.gguf").write_bytes(gguf_bytes)
    (local / "step_7.gguf").write_bytes(gguf_bytes[: len(gguf_bytes) // 2])
    (local / "step_8.gguf").write_bytes(gguf_bytes[:100])
    expected = {e.name: check_complete(e.path)[0] for e in listing.list_checkpoints(str(local / "*"))}
    assert expected == {"step_1": True, "step_2": False, "step_3": True, "step_4": False, "step_5": False,
                        "step_6.gguf": True, "step_7.gguf": False, "step_8.gguf": False}

    if store == "memory":
        fs = fsspec.filesystem("memory")
        base = f"/listing_{os.getpid()}"
        fs.rm(base, recursive=True) if fs.exists(base) else None
        for f in local.rglob("*"):
            if f.is_file():
                fs.pipe(f"{base}/{f.relative_to(local).as_posix()}", f.read_bytes())
        pattern = f"memory://{base}/*"
    else:
        pattern = f"file://{local}/*"
    monkeypatch.setattr(listing, "SMALL_BYTES", 512)  # even the tiny weights go through the header-only path
    read = []
    real_cat = fsspec.AbstractFileSystem.cat_file

    def counting_cat(self, path, start=None, end=None, **kw):
        data = real_cat(self, path, start=start, end=end, **kw)
        read.append((path, len(data)))
        return data

    monkeypatch.setattr(fsspec.AbstractFileSystem, "cat_file", counting_cat)
    if store == "memory":
        monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "cat_file", counting_cat)
    entries = listing.list_checkpoints(pattern)
    judged = {}
    for e in entries:
        judged[e.name] = listing.entry_complete(e)[0] if store == "memory" else \
            listing.entry_complete(listing.Entry(e.name, e.path, e.resolved, e.is_dir, e.files, local=False))[0]
    assert judged == expected
    if store == "memory":  # headers only: the safetensors weights themselves were never read
        st = [n for p, n in read if p.endswith("step_1/model.safetensors")]
        assert st and sum(st) < len(weights) // 2, st
        fs.rm(base, recursive=True)


def test_dcp_waits_for_its_config_json_and_symlinks_count_once(tmp_path, templates, caplog):
    """(b) no `model`-group fallback: a complete DCP dir without config.json waits with one line saying so;
    a top-level symlink is followed (like glob: scans) and two names of one target are one checkpoint."""
    from ckpteval.scan import expand_pattern

    root = tmp_path / "ckpts"
    root.mkdir()
    dcp_dir = _dcp_dir(root / "step_10", seed=1)
    elsewhere = _copy(templates[2], tmp_path / "elsewhere" / "step_20")
    (root / "step_20").symlink_to(elsewhere)
    (root / "step_21").symlink_to(elsewhere)
    clock = Clock()
    disc = Discovery(str(root), stable_s=1.0, clock=clock)
    with caplog.at_level("INFO", logger="ckpteval.watch"):
        disc.look()
        clock.t += 2
        looked = {c.name: c for c in disc.look()}
    assert looked["step_10"].state == INCOMPLETE and NO_FALLBACK in looked["step_10"].reason
    assert looked["step_20"].state == READY and "step_21" not in looked
    assert looked["step_20"].identity == checkpoint_identity(elsewhere)
    assert caplog.text.count("the same checkpoint as") == 1
    # a glob: scan sees the same two symlinks (it follows them too) and the DCP dir
    assert [Path(p).name for p in expand_pattern(str(root / "step_*"))] == ["step_10", "step_20", "step_21"]

    shutil.copy(templates[1] / "config.json", dcp_dir / "config.json")
    assert {c.name: c.state for c in disc.look()}["step_10"] == UNSTABLE
    clock.t += 2
    assert {c.name: c.state for c in disc.look()}["step_10"] == READY


def test_a_poisoned_checkpoint_does_not_stop_the_good_one_beside_it(tmp_path, templates, caplog):
    """A safetensors header whose length field overflows: that candidate waits (logged once, with the
    traceback), the listing goes on and the good checkpoint beside it becomes ready."""
    import struct

    root = tmp_path / "ckpts"
    root.mkdir()
    _copy(templates[1], root / "step_100")
    bad = _copy(templates[2], root / "step_200")
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 2**63 + 5) + b"{}" * 8)
    clock = Clock()
    disc = Discovery(str(root), stable_s=1.0, clock=clock)
    with caplog.at_level("WARNING", logger="ckpteval.watch"):
        for _ in range(5):
            looked = {c.name: c for c in disc.look()}
            clock.t += 1.5
    assert looked["step_100"].state == READY and looked["step_200"].state == INCOMPLETE
    assert len([r for r in caplog.records if "step_200" in r.getMessage()]) <= 1  # once per snapshot, not per look


def test_filesystem_events_wake_the_loop(tmp_path, monkeypatch):
    """A real watchdog observer on watch.dir: a checkpoint dir appearing wakes the loop before the next poll."""
    wake = threading.Event()
    observer = Discovery(str(tmp_path), stable_s=1).start_events(wake)
    try:
        assert observer is not None and observer.daemon
        time.sleep(0.2)  # the observer thread is scheduling its watch
        wake.clear()
        (tmp_path / "step_100").mkdir()
        (tmp_path / "step_100" / "model.safetensors").write_bytes(b"x")
        assert wake.wait(timeout=10), "no filesystem event reached the loop"
    finally:
        observer.stop()
        observer.join(timeout=5)
    monkeypatch.setitem(sys.modules, "watchdog.observers", None)  # without watchdog: polling only
    assert Discovery(str(tmp_path), stable_s=1).start_events(threading.Event()) is None


# ---------------------------------------------------------------------------------------------- in-process


def test_once_ledger_only_from_step_and_a_held_lock(tmp_path, monkeypatch, templates, val_shards):
    """tracking disabled: the local ledger alone gives exactly-once; from_step filters; a held lock stops a 2nd."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "ckpts"
    root.mkdir()
    for step, seed in ((100, 1), (200, 2), (300, 3)):
        _copy(templates[seed], root / f"step_{step}")
    args = ["mode=watch", f"watch.dir={root}", "watch.once=true", "watch.from_step=200", "tracking.enabled=false",
            "data=local", f"data.dataset_path={val_shards}", f"eval.seq_len={SEQ}", "eval.batch_size=8",
            "eval.steps=2", *FAST]
    summary = app.main(factories.compose(args))
    assert summary["watch/evaluated"] == 2 and summary["watch/done"] == 2
    ledger = Ledger(root / ".ckpteval_watch")
    assert {e["step"] for e in ledger.entries.values() if e["status"] == DONE} == {200, 300}
    assert app.main(factories.compose(args))["watch/evaluated"] == 0  # nothing twice

    holder = WatchLock(root / ".ckpteval_watch", stale_s=30, heartbeat_s=1)
    assert holder.acquire()
    try:
        _copy(templates[1], root / "step_400")
        assert app.main(factories.compose(args))["watch/evaluated"] == 0  # the other watcher's job
    finally:
        holder.release()
    assert app.main(factories.compose(args))["watch/evaluated"] == 1

    # a corrupt checkpoint: max_attempts, then recorded failed; watch.retry_failed=true tries again once fixed
    _copy(templates[2], root / "step_500")
    config = root / "step_500" / "config.json"
    good = config.read_text()
    config.write_text("{" + " " * (len(good) - 1))  # same size, so fixing it below keeps the identity
    identity = checkpoint_identity(root / "step_500")
    summary = app.main(factories.compose(args))
    assert summary["watch/failed"] == 1 and summary["watch/retries"] == 1 and summary["watch/evaluated"] == 0
    assert app.main(factories.compose(args))["watch/retries"] == 0  # failed is final without retry_failed
    mtime = config.stat().st_mtime_ns
    config.write_text(good)
    os.utime(config, ns=(mtime, mtime))
    assert checkpoint_identity(root / "step_500") == identity
    assert app.main(factories.compose(args + ["watch.retry_failed=true"]))["watch/evaluated"] == 1


def test_checkpoint_deleted_before_its_turn_is_skipped_with_a_warning(tmp_path, templates, val_shards, caplog):
    from ckpteval.parallel.dist import DistContext
    from ckpteval.watch.service import Watcher

    root = tmp_path / "ckpts"
    root.mkdir()
    _copy(templates[1], root / "step_100")
    _copy(templates[2], root / "step_200")
    cfg = factories.compose(["mode=watch", f"watch.dir={root}", "tracking.enabled=false", "watch.stable_s=0",
                             "data=local", f"data.dataset_path={val_shards}"])
    watcher = Watcher(cfg, DistContext(), tmp_path / "out")
    (tmp_path / "state").mkdir()
    watcher.ledger = Ledger(tmp_path / "state")
    work = watcher._work(watcher.discovery.look())
    assert [(w.cand.step, w.evaluation.name) for w in work] == [(100, "loss"), (200, "loss")]
    shutil.rmtree(root / "step_100")
    with caplog.at_level("WARNING", logger="ckpteval.watch"):
        work = watcher._work(watcher.discovery.look())
    assert [w.cand.step for w in work] == [200]
    assert "skipped" in caplog.text and "step_100 (step 100): deleted before it was evaluated" in caplog.text
    assert [e["status"] for e in watcher.ledger.entries.values() if e["step"] == 100] == [SKIPPED]


def test_one_log_line_per_state_change_over_many_polls(tmp_path, templates, val_shards, caplog):
    """A copy growing poll after poll ("truncated (N bytes)" with N changing) is one line, not one per poll."""
    from ckpteval.parallel.dist import DistContext
    from ckpteval.watch.service import Watcher

    root = tmp_path / "ckpts"
    root.mkdir()
    slow = root / "step_100"
    slow.mkdir()
    shutil.copy(templates[1] / "config.json", slow)
    weights = (templates[1] / "model.safetensors").read_bytes()
    cfg = factories.compose(["mode=watch", f"watch.dir={root}", "tracking.enabled=false", "watch.stable_s=0",
                             "data=local", f"data.dataset_path={val_shards}"])
    watcher = Watcher(cfg, DistContext(), tmp_path / "out")
    (tmp_path / "state").mkdir()
    watcher.ledger = Ledger(tmp_path / "state")
    polls = 40
    with caplog.at_level("INFO", logger="ckpteval.watch"):
        for i in range(1, polls + 1):
            (slow / "model.safetensors").write_bytes(weights[: len(weights) * i // (polls + 1)])
            assert watcher._work(watcher.discovery.look()) == []
        waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
        assert len(waiting) == 1 and "truncated" in waiting[0], waiting
        (slow / "model.safetensors").write_bytes(weights)
        for _ in range(polls):
            work = watcher._work(watcher.discovery.look())
    assert [(w.cand.step, w.evaluation.name) for w in work] == [(100, "loss")]
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("waiting for")]) == 1
    assert len([m for m in messages if m.startswith("found")]) == 1, messages


def test_the_lock_covers_the_watched_dir_not_the_state_dir(tmp_path, monkeypatch):
    """Two watchers of one dir with different watch.state_dir share one lock; a URL's lock lives in the store."""
    import fsspec

    from ckpteval.watch import ledger as ledger_mod
    from ckpteval.watch.ledger import lock_for

    root = tmp_path / "ckpts"
    root.mkdir()
    (tmp_path / "alias").symlink_to(root)
    a = lock_for(str(root), True, stale_s=30, heartbeat_s=0.05)
    b = lock_for(str(tmp_path / "alias"), True, stale_s=30, heartbeat_s=0.05)  # the same dir by another name
    assert a.path == b.path == root / ".ckpteval_watch" / "lock.json"
    assert a.acquire() and not b.acquire()
    a.release()
    assert b.acquire()
    b.release()

    # a read-only watched dir (simulated: the tests may run as root, who can write anything)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    monkeypatch.setattr(ledger_mod.os, "access", lambda p, mode: Path(p).parent != readonly)
    c, d = (lock_for(str(readonly), True, stale_s=30, heartbeat_s=0.05) for _ in range(2))
    assert c.path == d.path and c.path.parent.parent.name == "ckpteval-watch-locks"
    assert c.acquire() and not d.acquire()
    c.release()
    monkeypatch.undo()

    fs = fsspec.filesystem("memory")
    url = f"memory:///locktest_{os.getpid()}"
    e, f = (lock_for(url, False, stale_s=30, heartbeat_s=0.05) for _ in range(2))
    assert e.acquire() and not f.acquire()
    assert json.loads(fs.cat_file(f"/locktest_{os.getpid()}/.ckpteval_watch/lock.json"))["token"] == e.token
    e.release()
    assert not fs.exists(f"/locktest_{os.getpid()}/.ckpteval_watch/lock.json")
    assert f.acquire()
    g = lock_for(url, False, stale_s=30, heartbeat_s=0.05)
    g.token = "thief"
    g._write()  # another watcher judged us stale and took over: the next heartbeat notices
    f.heartbeat()
    assert f.lost
    f.release()


def test_bad_watch_settings_fail_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        app.main(factories.compose(["mode=watch", "tracking.enabled=false"]))
    assert exc.value.code == 2
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):  # watch.order is an Enum: refused while composing
        factories.compose(["mode=watch", f"watch.dir={tmp_path}", "watch.order=random", "tracking.enabled=false"])


# ---------------------------------------------------------------------------------------------- end to end


class WatcherProcess:
    """`python run.py mode=watch ...` with its output collected line by line."""

    def __init__(self, args: list[str], cwd: Path):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, str(factories.REPO / "run.py"), *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 90) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and seen == len(self.lines)):
                    raise AssertionError(f"no line matching {pattern!r}; output:\n" + self.output[-4000:])
                self._cond.wait(min(left, 0.5))

    def finish(self, timeout: float = 60) -> int:
        rc = self.proc.wait(timeout=timeout)
        time.sleep(0.1)  # let the reader drain
        return rc

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _eval_runs(db: Path):
    client, runs = factories.mlflow_runs(db)
    return client, [r for r in runs if r.data.tags.get("mode") == "watch" and r.data.tags.get("evaluation") != "watcher"]


def _write_slowly(src: Path, dst: Path, pause: float, extra_files: int = 0) -> None:
    """A trainer saving in place: weights and config first, then (optionally) more files trickling in."""
    dst.mkdir()
    for f in sorted(src.iterdir()):
        shutil.copy(f, dst / f.name)
    for i in range(extra_files):
        time.sleep(pause)
        (dst / f"rng_state_{i}.json").write_text(json.dumps({"i": i}))


@pytest.mark.slow
def test_watch_end_to_end_exactly_once_across_sigkill_and_sigterm(tmp_path, templates, val_shards):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    db = tmp_path / "mlflow.db"
    args = ["mode=watch", f"watch.dir={ckpts}", "data=local", f"data.dataset_path={val_shards}",
            f"eval.seq_len={SEQ}", "eval.batch_size=8", "eval.steps=-1", f"tracking.uri=sqlite:///{db}", *FAST]
    refs = {seed: _reference(templates[seed], val_shards) for seed in (1, 2)}
    seeds = {100: 1, 200: 2, 400: 3, 600: 1, 700: 2, 800: 1}

    # --- 1. backlog of one checkpoint + one a crashed save left incomplete; SIGKILL mid-evaluation.
    _copy(templates[1], ckpts / "step_100")
    incomplete = ckpts / "step_500"
    incomplete.mkdir()
    shutil.copy(templates[1] / "config.json", incomplete)
    weights = (templates[2] / "model.safetensors").read_bytes()
    (incomplete / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    procs = []
    try:
        # batch_size only changes the pace (the loss is token-weighted): slow enough to be killed inside
        w1 = WatcherProcess(args + ["eval.batch_size=1"], tmp_path)
        procs.append(w1)
        w1.wait_for(rf"evaluating {re.escape(str(ckpts / 'step_100'))} ")
        w1.proc.send_signal(signal.SIGKILL)
        w1.proc.wait()
        _, runs = _eval_runs(db)
        assert [r.info.status for r in runs] == ["RUNNING"]  # killed inside the evaluation run

        # --- 2. while it is down: a corrupt checkpoint and one half-written; restart, the trainer goes on.
        _copy(templates[3], ckpts / "step_300")
        (ckpts / "step_300" / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
        slow = ckpts / "step_200"
        slow.mkdir()
        for f in templates[2].iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, slow / f.name)
        (slow / "model.safetensors").write_bytes(weights[: len(weights) // 2])

        w2 = WatcherProcess(args + ["eval.batch_size=2"], tmp_path)
        procs.append(w2)
        w2.wait_for(r"ended MLflow run \w+ KILLED")
        w2.wait_for(rf"waiting for {re.escape(str(slow))} ")  # seen half-written: not taken
        with open(slow / "model.safetensors", "r+b") as f:  # the rest arrives in pieces
            f.seek(len(weights) // 2)
            rest = weights[len(weights) // 2:]
            for i in range(0, len(rest), len(rest) // 4 + 1):
                f.write(rest[i:i + len(rest) // 4 + 1])
                f.flush()
                time.sleep(0.15)
        w2.wait_for(rf"done loss on {re.escape(str(ckpts / 'step_100'))} ", timeout=120)
        w2.wait_for(rf"done loss on {re.escape(str(slow))} ", timeout=120)
        w2.wait_for(rf"failed loss on {re.escape(str(ckpts / 'step_300'))} .*after 2 attempt", timeout=120)

        # a checkpoint whose files keep changing for a while after its weights are complete
        trainer = threading.Thread(target=_write_slowly, args=(templates[3], ckpts / "step_400", 0.1, 10))
        trainer.start()
        trainer.join()
        w2.wait_for(rf"done loss on {re.escape(str(ckpts / 'step_400'))} ", timeout=120)

        # --- 3. SIGTERM inside an evaluation: that run ends KILLED, nothing marked done, exit 0.
        _copy(templates[1], ckpts / "step_600")
        w2.wait_for(rf"evaluating {re.escape(str(ckpts / 'step_600'))} ", timeout=120)
        w2.proc.send_signal(signal.SIGTERM)
        assert w2.finish() == 0, w2.output[-3000:]
        assert "aborted loss on" in w2.output

        # --- 4. watch.once=true, newest first: the rest of the backlog, then exit 0.
        _copy(templates[2], ckpts / "step_700")
        _copy(templates[1], ckpts / "step_800")
        w3 = WatcherProcess(args + ["watch.once=true", "watch.order=newest"], tmp_path)
        procs.append(w3)
        assert w3.finish(timeout=180) == 0, w3.output[-3000:]
        assert "backlog done" in w3.output
    finally:
        for p in procs:
            p.kill()

    client, runs = _eval_runs(db)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    by_step: dict[int, list] = {}
    for r in finished:
        by_step.setdefault(int(r.data.tags["step"]), []).append(r)
    assert sorted(by_step) == sorted(seeds)  # every complete checkpoint; not the corrupt or incomplete one
    for step, rs in by_step.items():
        assert len(rs) == 1, f"step {step}: {len(rs)} FINISHED runs"  # exactly once
        r = rs[0]
        path = ckpts / f"step_{step}"
        assert r.data.tags["ckpt_identity"] == checkpoint_identity(path)  # the finished files, not a half-way look
        assert r.data.tags["evaluation"] == "loss" and r.data.tags["ckpt"] == str(path)
        assert r.data.tags["mlflow.runName"] == f"watch:loss@{step}"
        history = client.get_metric_history(r.info.run_id, "eval/loss")
        assert [m.step for m in history] == [step]
        if seeds[step] in refs:
            assert abs(history[0].value - refs[seeds[step]]) < 1e-5

    corrupt = [r for r in runs if r.data.tags.get("step") == "300"]
    assert [r.info.status for r in corrupt] == ["FAILED", "FAILED"]  # max_attempts=2, then recorded failed
    assert sorted(r.data.tags.get("watch_result", "") for r in corrupt) == ["failed", "retry in 0.2s"]
    killed = {int(r.data.tags["step"]): r for r in runs if r.info.status == "KILLED"}
    assert sorted(killed) == [100, 600]  # SIGKILL orphan (ended by the restarted watcher) + SIGTERM abort
    assert "died" in killed[100].data.tags["error"] and "JobStopped" in killed[600].data.tags["error"]
    assert not [r for r in runs if r.data.tags.get("step") == "500"]  # incomplete: waited for, never evaluated

    newest_first = sorted((r for r in finished if int(r.data.tags["step"]) >= 600), key=lambda r: r.info.start_time)
    assert [int(r.data.tags["step"]) for r in newest_first] == [800, 700, 600]

    ledger = Ledger(ckpts / ".ckpteval_watch")
    assert ledger.count(DONE) == len(seeds) and ledger.count("failed") == 1
    _, all_runs = factories.mlflow_runs(db)
    watchers = [r for r in all_runs if r.data.tags.get("evaluation") == "watcher"]
    assert sorted(r.info.status for r in watchers) == ["FINISHED", "FINISHED", "KILLED"]
    stopped = {r.data.tags.get("stopped_by") for r in watchers if r.info.status == "FINISHED"}
    assert stopped == {"SIGTERM", "done"}
    last = max(watchers, key=lambda r: r.info.start_time)
    assert last.data.metrics["watch/done"] == len(seeds) and last.data.metrics["watch/failed"] == 1


# ---------------------------------------------------------------------------------------------- harness plan


from ckpteval.tasks import TASKS_DIR  # noqa: E402 - the offline lm-eval tasks (package data)


def _lm_eval_reference(ckpt: Path, task: str, limit: int) -> dict[str, float]:
    """lm-eval alone: a plain HFLM from the checkpoint dir, the same task, limit, seeds and batch size."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(ckpt), batch_size=8, device="cpu", dtype="float32")
    ref = simple_evaluate(model=lm, tasks=[task], limit=limit, log_samples=False,
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                          random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    return {f"harness/{task}/{k.split(',')[0]}": v for k, v in ref["results"][task].items()
            if "," in k and isinstance(v, float)}


@pytest.mark.slow
def test_plan_with_harness_and_heavy_cadence(tmp_path, monkeypatch, templates, val_shards):
    """plan=[loss,harness] on every checkpoint, the heavy suite only at multiples of every_n_steps."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "ckpts"
    root.mkdir()
    for step, seed in ((300, 3), (200, 2)):  # arrival order does not matter
        _copy(templates[seed], root / f"step_{step}")
    db = tmp_path / "mlflow.db"
    summary = app.main(factories.compose([
        "mode=watch", f"watch.dir={root}", "watch.once=true", "watch.plan=[loss,harness]", *FAST,
        "harness=offline", f"harness.include_path={TASKS_DIR}", "harness.tasks=[ckpteval_mc]", "harness.limit=8",
        "harness.batch_size=8", "watch.heavy.tasks=[ckpteval_rolling]", "watch.heavy.every_n_steps=200",
        "watch.heavy.limit=2", "data=local", f"data.dataset_path={val_shards}", f"eval.seq_len={SEQ}",
        "eval.batch_size=8", "eval.steps=2", f"tracking.uri=sqlite:///{db}"]))
    assert summary["watch/evaluated"] == 2 + 2 + 1 and summary["watch/failed"] == 0
    client, runs = _eval_runs(db)
    assert all(r.info.status == "FINISHED" for r in runs)
    pairs = sorted((int(r.data.tags["step"]), r.data.tags["evaluation"]) for r in runs)
    assert pairs == [(200, "harness"), (200, "heavy"), (200, "loss"), (300, "harness"), (300, "loss")]
    runs_by = {(int(r.data.tags["step"]), r.data.tags["evaluation"]): r for r in runs}
    heavy = runs_by[(200, "heavy")]
    assert heavy.data.tags["mlflow.runName"] == "watch:heavy@200"
    assert json.loads(heavy.data.params["harness.tasks"]) == ["ckpteval_rolling"]
    assert float(heavy.data.params["harness.limit"]) == 2
    assert any(k.startswith("harness/ckpteval_rolling/") for k in heavy.data.metrics)
    assert not any(k.startswith("harness/ckpteval_mc/") for k in heavy.data.metrics)
    harness = runs_by[(300, "harness")]
    expected = _lm_eval_reference(root / "step_300", "ckpteval_mc", 8)
    assert expected and {k: harness.data.metrics[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert [m.step for m in client.get_metric_history(harness.info.run_id, "harness/ckpteval_mc/acc")] == [300]

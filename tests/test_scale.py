# ruff: noqa: F811 - the fixtures are imported from tests.scale_fixtures
"""Scale-out against real engines on 127.0.0.1 (marker `scale`, run by .ci/run): an S3-compatible object store
(SeaweedFS), a shared `mlflow server` whose artifacts live in that store, and a single-node SLURM.

Losses are checked against plain transformers (`factories.reference_loss`) on the original local files."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import factories
from tests.scale_fixtures import (  # noqa: F401
    SECRET,
    kill_group,
    mlflow_server,
    s3_server,
    s3fs_client,
    sacct_completed,
    slurm_cluster,
    upload_dir,
    wait_for,
)

pytestmark = pytest.mark.scale  # its own tier (not slow): .ci/run installs the services, then pytest -m scale
SEQ = 32
DATA = ["data=local", f"eval.seq_len={SEQ}", "eval.batch_size=4", "eval.steps=-1"]


def _shards(path: Path) -> list[np.ndarray]:
    return [np.fromfile(f, dtype=np.uint16) for f in sorted(Path(path).glob("*.bin"))]


def _reference(ckpt: Path, shards_dir: Path) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return factories.reference_loss(model, _shards(shards_dir), SEQ)


def _no_secret(client, runs, *texts: str) -> None:
    for run in runs:
        assert not any(SECRET in f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()), run.info.run_id
    for text in texts:
        assert SECRET not in text


@pytest.fixture
def s3_run(s3_server):
    """A fresh prefix s3://ckpts/<unique> for one test; removed afterwards."""
    prefix = f"ckpts/{uuid.uuid4().hex[:10]}"
    yield f"s3://{prefix}"
    fs = s3fs_client()
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)


# ---------------------------------------------------------------------------------------------- object store


def test_s3_loss_equals_reference_and_the_download_is_deleted(tmp_path, s3_run, tiny_tokenizer_dir,
                                                              tiny_token_shards):
    local = factories.make_hf_checkpoint(tmp_path / "src" / "step_200", tiny_tokenizer_dir, seed=3)
    (local / "optimizer.pt").write_bytes(b"\0" * 4096)  # separate optimizer state: never downloaded
    upload_dir(local, f"{s3_run}/step_200")
    cache, db = tmp_path / "cache", tmp_path / "mlflow.db"
    proc = factories.run_cli(["mode=loss", f"ckpt={s3_run}/step_200", *DATA, f"data.dataset_path={tiny_token_shards}",
                              f"tracking.uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                             env={"CKPTEVAL_REMOTE_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = factories.last_json_line(proc.stdout)
    assert line["step"] == 200
    assert line["eval/loss"] == pytest.approx(_reference(local, tiny_token_shards), abs=1e-5)
    assert not any(cache.iterdir()), list(cache.iterdir())  # the copy is gone after the job
    client, runs = factories.mlflow_runs(db)
    [run] = runs
    assert run.info.status == "FINISHED" and run.data.tags["ckpt"] == f"{s3_run}/step_200"
    _no_secret(client, runs, proc.stdout, proc.stderr)


def test_materialize_skips_optimizer_files_reuses_unchanged_and_rekeys_changed(tmp_path, s3_run, tiny_hf_ckpt,
                                                                               monkeypatch):
    from ckpteval.checkpoint import remote

    monkeypatch.setenv("CKPTEVAL_REMOTE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CKPTEVAL_KEEP_DOWNLOADS", "1")
    upload_dir(tiny_hf_ckpt, f"{s3_run}/step_120")
    fs = s3fs_client()
    fs.pipe(f"{s3_run.removeprefix('s3://')}/step_120/optimizer.pt", b"x" * 1000)
    fs.pipe(f"{s3_run.removeprefix('s3://')}/config.json", (tiny_hf_ckpt / "config.json").read_bytes())
    first = Path(remote.materialize(f"{s3_run}/step_120"))
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in tiny_hf_ckpt.iterdir())
    assert (first.parent / "config.json").is_file()  # the run dir's loose config comes along
    assert (first / "model.safetensors").read_bytes() == (tiny_hf_ckpt / "model.safetensors").read_bytes()
    marker = (first.parent / ".complete").stat().st_mtime_ns
    assert Path(remote.materialize(f"{s3_run}/step_120")) == first  # unchanged listing: the same copy
    assert (first.parent / ".complete").stat().st_mtime_ns == marker  # ... not downloaded again
    fs.pipe(f"{s3_run.removeprefix('s3://')}/step_120/config.json", b'{"changed": 1}')
    assert Path(remote.materialize(f"{s3_run}/step_120")) != first  # rewritten checkpoint: a new key
    monkeypatch.delenv("CKPTEVAL_KEEP_DOWNLOADS")
    remote.cleanup()
    assert not any((tmp_path / "cache").iterdir())


def test_s3_harness_equals_stock_lm_eval(tmp_path, s3_run, tiny_hf_ckpt):
    from tests.test_harness import SEED, TASKS_DIR, _reference, _reference_metrics

    upload_dir(tiny_hf_ckpt, f"{s3_run}/step_120")
    proc = factories.run_cli(["mode=harness", f"ckpt={s3_run}/step_120", "harness=offline",
                              f"harness.include_path={TASKS_DIR}", "harness.batch_size=8", f"harness.seed={SEED}",
                              f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.run.dir={tmp_path / 'run'}"],
                             cwd=tmp_path, env={"CKPTEVAL_REMOTE_CACHE": str(tmp_path / "cache")}, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = factories.last_json_line(proc.stdout)
    ref = _reference_metrics(_reference(tiny_hf_ckpt))
    assert ref
    for key, value in ref.items():  # accuracies exactly, perplexities to 1e-6 (as tests/test_harness.py)
        assert line[key] == (value if "ckpteval_mc" in key else pytest.approx(value, rel=1e-6)), key
    assert not any((tmp_path / "cache").iterdir())


def _make_run(root: Path, tokenizer_dir: Path, steps: dict[int, int]) -> dict[int, Path]:
    return {step: factories.make_hf_checkpoint(root / f"step_{step}", tokenizer_dir, seed=seed)
            for step, seed in steps.items()}


def test_s3_glob_scan(tmp_path, s3_run, tiny_tokenizer_dir, tiny_token_shards):
    """glob:s3://.../step_* expands through the store's listing: 2 complete checkpoints evaluated, one holding
    only its config (an upload under way) skipped with a warning."""
    local = _make_run(tmp_path / "src", tiny_tokenizer_dir, {100: 0, 300: 1})
    for step, path in local.items():
        upload_dir(path, f"{s3_run}/step_{step}")
    s3fs_client().pipe(f"{s3_run.removeprefix('s3://')}/step_500/config.json", b"{}")
    db = tmp_path / "mlflow.db"
    proc = factories.run_cli(["-m", "mode=loss", f"ckpt=glob:{s3_run}/step_*", *DATA,
                              f"data.dataset_path={tiny_token_shards}", f"tracking.uri=sqlite:///{db}",
                              "hydra.sweep.dir=sweep"], cwd=tmp_path, timeout=500,
                             env={"CKPTEVAL_REMOTE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping incomplete checkpoint" in proc.stdout + proc.stderr
    assert "sweep summary: 2 job(s), 2 completed" in proc.stdout
    client, runs = factories.mlflow_runs(db)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert sorted(children) == ["loss@100", "loss@300"]
    for step, path in local.items():
        run = children[f"loss@{step}"]
        assert run.info.status == "FINISHED"
        [point] = client.get_metric_history(run.info.run_id, "eval/loss")
        assert point.value == pytest.approx(_reference(path, tiny_token_shards), abs=1e-5)
    assert not any((tmp_path / "cache").iterdir())
    _no_secret(client, runs, proc.stdout, proc.stderr)


def _slow_multipart_upload(local: Path, url: str, part_bytes: int = 5 * 2**20, pause=None) -> None:
    """Upload a sharded checkpoint the way a slow trainer-side copy would: index and config first, then each
    shard as a multipart upload part by part, calling `pause()` between parts."""
    fs = s3fs_client()
    bucket, _, key = url.removeprefix("s3://").partition("/")
    files = sorted(local.iterdir(), key=lambda f: (f.suffix == ".safetensors", f.name))
    for f in files:
        if f.suffix != ".safetensors":
            fs.put_file(str(f), f"{bucket}/{key}/{f.name}")
            continue
        data = f.read_bytes()
        mpu = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{key}/{f.name}")
        parts = []
        for i, start in enumerate(range(0, len(data), part_bytes), start=1):
            out = fs.call_s3("upload_part", Bucket=bucket, Key=f"{key}/{f.name}", UploadId=mpu["UploadId"],
                             PartNumber=i, Body=data[start:start + part_bytes])
            parts.append({"PartNumber": i, "ETag": out["ETag"]})
            if pause:
                pause()
        fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=f"{key}/{f.name}", UploadId=mpu["UploadId"],
                   MultipartUpload={"Parts": parts})
    fs.invalidate_cache()


def _watch(tmp_path: Path, url: str, shards: Path, tracking: str, state: Path, log: Path,
           extra: list[str] = ()) -> subprocess.Popen:
    cmd = [sys.executable, str(factories.REPO / "run.py"), "mode=watch", f"watch.dir={url}", "watch.interval=0.5",
           "watch.stable_s=1", "watch.events=false", f"watch.state_dir={state}", *DATA,
           f"data.dataset_path={shards}", f"tracking.uri={tracking}", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "CKPTEVAL_REMOTE_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _all_runs(client, max_results: int = 1000) -> list:
    """Runs of every experiment of the store (one experiment per training run by default)."""
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=max_results) if ids else []


def _finished_losses(client) -> dict[str, list]:
    """{watch:loss@N: [eval/loss of each FINISHED run]}: the watcher's evaluation runs."""
    out: dict[str, list] = {}
    for r in _all_runs(client):
        if r.info.run_name.startswith("watch:loss@") and r.info.status == "FINISHED":
            out.setdefault(r.info.run_name, []).append(r.data.metrics.get("eval/loss"))
    return out


def _big_sharded_ckpt(out: Path, tokenizer_dir: Path, seed: int) -> Path:
    """~13 MB of weights in two shards, so each shard is a real multipart upload (5 MB parts)."""
    from transformers import AutoTokenizer

    model = factories.make_model(seed=seed, hidden=384, layers=2, heads=4, kv_heads=2)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="8MB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    assert len(list(out.glob("*.safetensors"))) >= 2
    return out


def test_s3_watcher_never_takes_a_half_uploaded_checkpoint(tmp_path, s3_run, tiny_tokenizer_dir, tiny_token_shards):
    from mlflow.tracking import MlflowClient

    local = {s: _big_sharded_ckpt(tmp_path / "src" / f"step_{s}", tiny_tokenizer_dir, seed=s) for s in (10, 20)}
    db = tmp_path / "mlflow.db"
    log = tmp_path / "watch.log"
    proc = _watch(tmp_path, s3_run, tiny_token_shards, f"sqlite:///{db}", tmp_path / "state", log)
    try:
        # the watcher's first look (an empty prefix) is under way before the uploads start
        wait_for(lambda: "watching" in log.read_text() or proc.poll() is not None, 120, "the watcher to start")
        for step, path in local.items():
            # a slow copy: ~4 watcher polls (interval 0.5 s) see every half-uploaded state. The pause only
            # makes the scenario slow; nothing waits on it (the assertions are on the outcome)
            _slow_multipart_upload(path, f"{s3_run}/step_{step}", pause=lambda: time.sleep(2.0))
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        wait_for(lambda: len(_finished_losses(client)) == 2 or proc.poll() is not None, 300,
                 "both checkpoints evaluated")
    finally:
        kill_group(proc)
    text = log.read_text()
    losses = _finished_losses(client)
    assert sorted(losses) == ["watch:loss@10", "watch:loss@20"], text[-3000:]
    for step, path in local.items():
        [loss] = losses[f"watch:loss@{step}"]  # exactly once
        assert loss == pytest.approx(_reference(path, tiny_token_shards), abs=1e-5)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert not (tmp_path / "state" / "downloads").exists() or not any((tmp_path / "state" / "downloads").iterdir())
    assert SECRET not in text


# ---------------------------------------------------------------------------------------------- SLURM

SLURM = ["hydra/launcher=slurm", "hydra.sweep.dir=sweep", "hydra.launcher.timeout_min=20"]


def _children(db: Path) -> dict:
    client, runs = factories.mlflow_runs(db)
    return client, {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId")}


def test_slurm_scan_one_job_per_checkpoint_and_a_corrupt_one_fails_alone(tmp_path, slurm_cluster,
                                                                          tiny_tokenizer_dir, tiny_token_shards):
    local = _make_run(tmp_path / "ckpts", tiny_tokenizer_dir, {100: 0, 200: 1})
    broken = factories.make_hf_checkpoint(tmp_path / "ckpts" / "step_300", tiny_tokenizer_dir, seed=2)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))  # tensors don't fit
    before = set(sacct_completed())
    db = tmp_path / "mlflow.db"
    proc = factories.run_cli(["-m", "mode=loss", "ckpt=glob:ckpts/step_*", *DATA, f"data.dataset_path={tiny_token_shards}",
                              f"tracking.uri=sqlite:///{db}", *SLURM], cwd=tmp_path, timeout=500)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one job failed; the scan finished and says so
    assert "sweep summary: 3 job(s), 2 completed, 1 failed" in proc.stdout, proc.stdout[-3000:]
    # the per-job fixed cost (each SLURM job is a new process: its start to its first request), from the 2 jobs
    fixed = re.search(r"fixed cost per job: ([\d.]+) s median, ([\d.]+)-([\d.]+) s \(time/startup_seconds: .* "
                      r"over 2 job\(s\)\)", proc.stdout)
    assert fixed and 0 < float(fixed[2]) <= float(fixed[1]) <= float(fixed[3]) < 300, proc.stdout[-3000:]
    jobs = {k: v for k, v in sacct_completed().items() if k not in before}
    assert len(jobs) == 3 and {name for name, _, _ in jobs.values()} == {"run"}, jobs  # one SLURM job each
    client, children = _children(db)
    assert sorted(children) == ["loss@100", "loss@200", "loss@300"]
    for step, path in local.items():
        run = children[f"loss@{step}"]
        assert run.info.status == "FINISHED"
        [point] = client.get_metric_history(run.info.run_id, "eval/loss")
        assert point.value == pytest.approx(_reference(path, tiny_token_shards), abs=1e-5)
    failed = children["loss@300"]
    assert failed.info.status == "FAILED" and "does not match its architecture" in failed.data.tags["error"]


def test_slurm_two_tasks_are_two_ranks_and_fsdp_gives_the_single_process_loss(tmp_path, slurm_cluster,
                                                                              tiny_hf_ckpt, tiny_token_shards):
    db = tmp_path / "mlflow.db"
    proc = factories.run_cli(["-m", "mode=loss", f"ckpt=glob:{tiny_hf_ckpt}", *DATA, "parallel=fsdp",
                              f"data.dataset_path={tiny_token_shards}", f"tracking.uri=sqlite:///{db}", *SLURM,
                              "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1"],
                             cwd=tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    client, children = _children(db)
    # one run: rank 1 knew it was rank 1 of 2 (RANK/WORLD_SIZE from the task env), so only rank 0 logged
    [run] = children.values()
    assert run.info.status == "FINISHED"
    [point] = client.get_metric_history(run.info.run_id, "eval/loss")
    assert point.value == pytest.approx(_reference(tiny_hf_ckpt, tiny_token_shards), abs=1e-5)
    logs = sorted((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
    assert [p.name.rsplit("_", 2)[-2] for p in logs] == ["0", "1"], logs  # two tasks ran the job


def test_scancel_ends_the_run_killed(tmp_path, slurm_cluster, tiny_hf_ckpt, tiny_token_shards):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    log = tmp_path / "scan.log"
    cmd = [sys.executable, str(factories.REPO / "run.py"), "-m", "mode=loss", f"ckpt=glob:{tiny_hf_ckpt}", "data=local",
           f"eval.seq_len={SEQ}", "eval.batch_size=1", "eval.steps=1000000",  # wraps around: runs until stopped
           f"data.dataset_path={tiny_token_shards}", f"tracking.uri=sqlite:///{db}", *SLURM]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    before = set(sacct_completed())
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")

        def running_child():
            if proc.poll() is not None:
                raise AssertionError(log.read_text()[-3000:])
            runs = _all_runs(client) if db.exists() else []
            return next((r for r in runs if r.info.run_name.startswith("loss@") and r.info.status == "RUNNING"),
                        None)

        child = wait_for(running_child, 240, "the SLURM job's MLflow run to be RUNNING")
        job_log = lambda: "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
        wait_for(lambda: "evaluating" in job_log(), 240, "the job to be evaluating")  # a long eval under way
        job_ids = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()
        assert len(job_ids) == 1, job_ids
        subprocess.run(["scancel", job_ids[0]], check=True)
        wait_for(lambda: client.get_run(child.info.run_id).info.status != "RUNNING", 120,
                 "the cancelled job's run to end")
        assert client.get_run(child.info.run_id).info.status == "KILLED"
        wait_for(lambda: {k: v for k, v in sacct_completed().items() if k not in before}, 60, "the job's record")
        [(_, state, _)] = [v for k, v in sacct_completed().items() if k not in before]
        assert state == "CANCELLED"
    finally:
        kill_group(proc)


def _store_windows(store: Path, ckpt: Path) -> int:
    """Windows the result store holds for `ckpt` (read here: `<crc32> <json>` lines, entries by their meta)."""
    count = 0
    for meta in store.glob("*/meta.json"):
        try:
            if json.loads(meta.read_text())["checkpoint"]["path"] != str(ckpt):
                continue
        except (OSError, ValueError, KeyError):
            continue
        for f in meta.parent.glob("*.jsonl"):
            count += sum(len(json.loads(line[9:])["r"]) for line in f.read_bytes().split(b"\n")[:-1])
    return count


def test_slurm_requeue_of_a_running_scan_job_resumes_it(tmp_path, slurm_cluster, tiny_hf_ckpt):
    """`scontrol requeue` (what a preemption does) of a running scan job: SLURM stops it (that run ends KILLED) and
    runs it again; the second run resumes from the result store and ends FINISHED with the numbers of the scan's
    other job, which evaluated a copy of the same weights without being stopped."""
    from mlflow.tracking import MlflowClient

    ckpts = tmp_path / "ckpts"
    shutil.copytree(tiny_hf_ckpt, ckpts / "step_100")
    shutil.copytree(tiny_hf_ckpt, ckpts / "step_200")
    shards = factories.make_token_shards(tmp_path / "shards", lengths=(400_001,))  # 12500 windows: a long job
    db, store, log = tmp_path / "mlflow.db", tmp_path / "store", tmp_path / "scan.log"
    cmd = [sys.executable, str(factories.REPO / "run.py"), "-m", "mode=loss", "ckpt=glob:ckpts/step_*", "data=local",
           f"eval.seq_len={SEQ}", "eval.batch_size=4", "eval.steps=-1", f"data.dataset_path={shards}",
           f"tracking.uri=sqlite:///{db}", f"cache.dir={store}", "cache.flush_s=0", *SLURM]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        def progress():
            if proc.poll() is not None:
                raise AssertionError(log.read_text()[-3000:])
            return _store_windows(store, ckpts / "step_100") >= 1500

        wait_for(progress, 400, "the first job to have evaluated 1500 windows")
        ids = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()
        [first] = [i for i in ids if i.endswith("_0")]  # array task 0: the first checkpoint, step_100
        subprocess.run(["scontrol", "requeue", first], check=True)
        proc.wait(timeout=900)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert proc.returncode == 0 and "sweep summary: 2 job(s), 2 completed" in text, text[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = collections.defaultdict(list)
    for r in _all_runs(client):
        if r.data.tags.get("mlflow.parentRunId"):
            runs[r.info.run_name].append(r)
    assert sorted(r.info.status for r in runs["loss@100"]) == ["FINISHED", "KILLED"]  # stopped, then resumed
    [again] = [r for r in runs["loss@100"] if r.info.status == "FINISHED"]
    [other] = runs["loss@200"]
    assert other.info.status == "FINISHED"
    for key in ("eval/loss", "eval/bpb", "eval/loss_stderr", "eval/tokens"):
        assert again.data.metrics[key] == other.data.metrics[key], key  # the uninterrupted numbers, bit for bit
    job_log = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob(f"{first}/*_log.*"))
    found = re.search(r"loss on data: resumed (\d+) of 12500 windows", job_log)
    assert found and int(found.group(1)) >= 1500, job_log[-3000:]


# ---------------------------------------------------------------------------------------------- shared MLflow


def _bucket_files(prefix: str) -> list[str]:
    fs = s3fs_client()
    return [p[len(prefix) + 1:] for p in fs.find(prefix)]


def test_mlflow_server_artifacts_land_in_the_bucket(tmp_path, mlflow_server, tiny_tokenizer_dir, tiny_token_shards,
                                                    tiny_hf_ckpt):
    """A scan's summary CSV/PNG and a harness job's lm-eval results and samples, logged to a real `mlflow
    server` that proxies artifacts to s3://mlartifacts: listed by the server's artifact API and in the bucket."""
    from mlflow.tracking import MlflowClient

    from tests.test_harness import SEED, TASKS_DIR

    _make_run(tmp_path / "ckpts", tiny_tokenizer_dir, {100: 0, 200: 1})
    uri = mlflow_server["uri"]
    scan = factories.run_cli(["-m", "mode=loss", "ckpt=glob:ckpts/step_*", *DATA, f"data.dataset_path={tiny_token_shards}",
                              f"tracking.uri={uri}", "hydra.sweep.dir=sweep"], cwd=tmp_path, timeout=500)
    assert scan.returncode == 0, scan.stderr[-3000:]
    harness = factories.run_cli(["mode=harness", f"ckpt={tiny_hf_ckpt}", "harness=offline",
                                 f"harness.include_path={TASKS_DIR}", "harness.batch_size=8", f"harness.seed={SEED}",
                                 f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'h'}"], cwd=tmp_path, timeout=500)
    assert harness.returncode == 0, harness.stderr[-3000:]

    client = MlflowClient(tracking_uri=uri)
    runs = _all_runs(client)
    [parent] = [r for r in runs if r.data.tags.get("ckpteval.sweep") == "true"]
    [h_run] = [r for r in runs if r.info.run_name.startswith("harness@")]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "summary")} == {
        "summary/summary.csv", "summary/summary.png", "summary/signal.png"}

    def listed(run_id: str, path: str = "") -> list[str]:  # the server's artifact API, recursively
        out = []
        for a in client.list_artifacts(run_id, path):
            out += listed(run_id, a.path) if a.is_dir else [a.path]
        return out

    h_files = listed(h_run.info.run_id, "lm_eval")
    assert any(f.endswith(".json") and "samples" not in f for f in h_files), h_files  # results
    assert any("samples" in f for f in h_files), h_files
    in_bucket = _bucket_files(mlflow_server["prefix"])
    for run_id, files in ((parent.info.run_id, ["summary/summary.csv", "summary/summary.png"]),
                          (h_run.info.run_id, h_files)):
        for f in files:
            assert any(p.endswith(f"{run_id}/artifacts/{f}") for p in in_bucket), (f, in_bucket[:20])
    png = s3fs_client().cat(next(p for p in s3fs_client().find(mlflow_server["prefix"]) if p.endswith("summary.png")))
    assert png[:4] == b"\x89PNG"


def _loss_runs(uri: str) -> dict[str, list[str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    by_step: dict[str, list[str]] = {}
    for r in _all_runs(client):
        if r.info.run_name.startswith("watch:loss@"):
            by_step.setdefault(r.info.run_name, []).append(r.info.status)
    return by_step


def _run_watchers(tmp_path: Path, s3_run: str, shards: Path, uri: str, names: list[str]) -> list[str]:
    """Start one `watch.once=true` watcher per name (own state dir: another machine) at once; their logs."""
    procs = [_watch(tmp_path, s3_run, shards, uri, tmp_path / f"state_{n}", tmp_path / f"watch_{n}.log",
                    extra=["watch.once=true"]) for n in names]
    try:
        for proc in procs:
            wait_for(lambda p=proc: p.poll() is not None, 400, "the watcher to finish its backlog (watch.once)")
    finally:
        for proc in procs:
            kill_group(proc)
    logs = [(tmp_path / f"watch_{n}.log").read_text() for n in names]
    assert all(p.returncode == 0 for p in procs), [text[-2000:] for text in logs]
    assert all(SECRET not in text for text in logs)
    return logs


def test_a_second_watcher_repeats_nothing_the_server_has(tmp_path, mlflow_server, s3_run, tiny_tokenizer_dir,
                                                         tiny_token_shards):
    """Watcher A (its own state dir) evaluates the backlog; watcher B on another machine (a fresh state dir, no
    ledger) then evaluates only the checkpoint that arrived since: the server's FINISHED runs are its memory."""
    local = _make_run(tmp_path / "src", tiny_tokenizer_dir, {10: 0, 20: 1, 30: 2})
    for step in (10, 20):
        upload_dir(local[step], f"{s3_run}/step_{step}")
    uri = mlflow_server["uri"]
    _run_watchers(tmp_path, s3_run, tiny_token_shards, uri, ["a"])
    assert _loss_runs(uri) == {"watch:loss@10": ["FINISHED"], "watch:loss@20": ["FINISHED"]}
    upload_dir(local[30], f"{s3_run}/step_30")
    [log_b] = _run_watchers(tmp_path, s3_run, tiny_token_shards, uri, ["b"])
    assert _loss_runs(uri) == {f"watch:loss@{s}": ["FINISHED"] for s in local}, log_b[-3000:]
    assert "already evaluated" in log_b


def test_two_watchers_share_the_work_through_the_server(tmp_path, mlflow_server, s3_run, tiny_tokenizer_dir,
                                                        tiny_token_shards):
    """Two watcher processes (two machines: separate state dirs) on one s3:// dir, both logging to the server,
    started together: every checkpoint is evaluated (FINISHED) exactly once, none left RUNNING or KILLED. The lock
    object in the watched dir usually lets one of them in; when both get past it (an object store has no atomic
    create-if-absent), each claims a pair by creating its run and steps back when it sees another live claim."""
    local = _make_run(tmp_path / "src", tiny_tokenizer_dir, {10: 0, 20: 1, 30: 2})
    for step, path in local.items():
        upload_dir(path, f"{s3_run}/step_{step}")
    _run_watchers(tmp_path, s3_run, tiny_token_shards, mlflow_server["uri"], ["a", "b"])
    assert _loss_runs(mlflow_server["uri"]) == {f"watch:loss@{s}": ["FINISHED"] for s in local}

"""A job's fixed cost: `time/startup_seconds` (the job's start to its first request), imports on demand, and the
CLI's exit without teardown.

References: a child process's launch and first line (as its parent and it see them), the test's own clock
around a job, the timestamps of the job's own log lines; a `python run.py` process's imports are read from its
`sys.modules` at exit.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime

import pytest

from ckpteval import app, startup
from ckpteval.tasks import TASKS_DIR
from tests import factories

# Run by `python -c`: run.py with a report of the heavy modules it imported, written when it exits (atexit
# handlers run before run.py's exit without teardown ends the process).
MODULES_AT_EXIT = """
import atexit, json, runpy, sys
out, sys.argv = sys.argv[1], sys.argv[2:]
heavy = ("torch", "transformers", "lm_eval", "mlflow", "datasets", "sqlalchemy", "deepspeed", "peft")
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(m for m in heavy if m in sys.modules))))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_process_start_time_is_when_the_process_started():
    """A child process's start as it reads it lies between its parent's launch and the child's first line."""
    import subprocess

    code = "import time; t = time.time(); from ckpteval import startup; print(startup.process_start_time(), t)"
    launched = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    started, first_line = map(float, out.split())
    assert launched - 0.05 <= started <= first_line + 0.05, (launched, started, first_line)  # 10 ms ticks


def test_clock_stops_at_the_first_forward_and_resets():
    import torch

    layer = torch.nn.Linear(2, 2)
    startup.job_started()  # in-process (no run.py): the clock starts now
    time.sleep(0.2)
    startup.watch_first_request()
    time.sleep(0.1)
    layer(torch.zeros(1, 2))
    layer(torch.zeros(1, 2))
    measured = startup.take()
    assert 0.3 <= measured[startup.METRIC] < 5
    assert startup.take() == {}  # reset: the next job starts its own clock
    startup.job_started()
    startup.watch_first_request()
    assert startup.take() == {}  # no forward, no number
    startup.evaluation_started()  # an evaluation no job started (the watcher's next checkpoint)
    startup.watch_first_request()
    layer(torch.zeros(1, 2))
    assert 0 <= startup.take()[startup.METRIC] < 1


def test_first_job_of_a_job_process_counts_from_the_process_start(monkeypatch):
    """run.py's process, or a SLURM job's (submitit sets SUBMITIT_EXECUTOR): its first job's clock starts at the
    process's start; later jobs, and jobs in any other process (this one), at their own start."""
    monkeypatch.setitem(startup._state, "jobs", 0)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    startup.job_started()
    assert abs(startup._state["start"] - startup.process_start_time()) < 0.05
    startup.job_started()
    assert abs(startup._state["start"] - time.time()) < 0.05
    monkeypatch.setitem(startup._state, "jobs", 0)
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    startup.job_started()
    assert abs(startup._state["start"] - time.time()) < 0.05
    startup.take()


def test_loss_job_reports_its_startup(tmp_path, tiny_hf_ckpt, tiny_token_shards, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = factories.compose(["mode=loss", f"ckpt={tiny_hf_ckpt}", "data=local",
                             f"data.dataset_path={tiny_token_shards}", "eval.seq_len=32", "eval.steps=2",
                             "tracking.enabled=false"])
    start = time.time()
    result = app.main(cfg)
    assert 0 < result[startup.METRIC] < time.time() - start


def _log_time(log: str, text: str) -> float:
    """When the job logged its first line containing `text` (Hydra's `[%Y-%m-%d %H:%M:%S,ms]` prefix)."""
    line = next(line for line in log.splitlines() if text in line)
    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.slow
def test_cli_imports_only_what_the_mode_uses_and_times_its_startup(tmp_path, tiny_hf_ckpt, tiny_token_shards):
    """mode=loss without tracking imports neither lm-eval nor MLflow, mode=harness no MLflow, a config error
    not even torch. Each job's time/startup_seconds counts from its process's start to the first forward: at
    least from its "starting" log line to the line logged right before the first batch, at most the process's
    wall clock. run.py ends without teardown: exit 0, results.json and the run log complete."""
    common = ["tracking.enabled=false", f"paths.outputs={tmp_path / 'out'}"]
    jobs = {
        "loss": (["mode=loss", f"ckpt={tiny_hf_ckpt}", "data=local", f"data.dataset_path={tiny_token_shards}",
                  "eval.seq_len=32", "eval.steps=2"], "evaluating", {"lm_eval", "mlflow", "datasets"}),
        "harness": (["mode=harness", f"ckpt={tiny_hf_ckpt}", "harness=offline", f"harness.include_path={TASKS_DIR}",
                     "harness.tasks=[ckpteval_mc]", "harness.limit=8"], "Running loglikelihood requests",
                    {"mlflow", "sqlalchemy"}),
    }
    for name, (args, before_forward, absent) in jobs.items():
        report, run_dir = tmp_path / f"{name}.json", tmp_path / name
        launched = time.time()
        proc = factories.run_cli([*args, *common, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                                 launcher=[sys.executable, "-c", MODULES_AT_EXIT, str(report)])
        wall = time.time() - launched
        assert proc.returncode == 0, proc.stderr[-3000:]
        imported = set(json.loads(report.read_text()))
        assert "torch" in imported and not imported & absent, (name, imported)
        line = factories.last_json_line(proc.stdout)
        assert json.loads((run_dir / "results.json").read_text()) == line
        log = (run_dir / "run.log").read_text()
        assert f"{name}: starting" in log
        at_least = _log_time(log, before_forward) - _log_time(log, f"{name}: starting")
        assert at_least - 0.01 <= line[startup.METRIC] <= wall, (name, at_least, line[startup.METRIC], wall)
        if name == "harness":
            assert any("harness:" in x and "first request" in x for x in log.splitlines())
    report = tmp_path / "error.json"
    proc = factories.run_cli(["mode=loss", *common], cwd=tmp_path,
                             launcher=[sys.executable, "-c", MODULES_AT_EXIT, str(report)])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: mode=loss needs")
    assert json.loads(report.read_text()) == []

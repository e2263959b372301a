"""A job's fixed cost: `time/startup_seconds`, from the job's start to its first request, logged with loss and
harness results.

    startup.job_started()           # app.main, once per job
    startup.evaluation_started()    # each per-checkpoint evaluation (the watcher's evaluations start here)
    startup.watch_first_request()   # once the model is loaded: the next module forward stops the clock
    result.update(startup.take())   # {"time/startup_seconds": 4.1} ({} if nothing ran); resets the clock

The clock of the first job of a `python run.py` process (or of a SLURM job's process) starts when the process
started (read from /proc, so Python's start-up, every import and Hydra's composition count); a later job of
the same process (a local `-m` scan, the watcher's next checkpoint) starts it when it starts, and so does a
job run in-process (tests, notebooks). It stops at the first module forward after the model is loaded: the
first request the job sends to the model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

METRIC = "time/startup_seconds"

_state: dict = {"cli": False, "jobs": 0, "start": None, "first": None, "hook": None}


def launched_from_cli() -> None:
    """run.py: this process exists to run jobs, so its first job's clock starts with the process."""
    _state["cli"] = True


def process_start_time() -> float | None:
    """When this process started (epoch seconds, 10 ms resolution), from /proc; None without /proc."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(after_name[19])  # field 22 of proc(5), starttime in clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def job_started() -> None:
    first = _state["jobs"] == 0
    _state["jobs"] += 1
    _clear()
    _state["start"] = (process_start_time() if first and _runs_jobs_only() else None) or time.time()


def _runs_jobs_only() -> bool:
    """A process started to run jobs: `python run.py`, or a submitit job (hydra/launcher=slurm: one process per
    job, which submitit starts with SUBMITIT_EXECUTOR set; its local executor sets SUBMITIT_LOCAL_JOB_ID)."""
    return _state["cli"] or "SUBMITIT_EXECUTOR" in os.environ or "SUBMITIT_LOCAL_JOB_ID" in os.environ


def evaluation_started() -> None:
    """A per-checkpoint evaluation begins: its clock starts now unless its job's clock is already running."""
    if _state["start"] is None:
        _state["start"] = time.time()


def watch_first_request() -> None:
    """Stop the clock at the next forward of any module (a global forward pre-hook that removes itself)."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    if _state["hook"] is not None or _state["first"] is not None:
        return

    def first_forward(_module, _args):
        if _state["first"] is None:
            _state["first"] = time.time()
        if _state["hook"] is not None:
            _state["hook"].remove()
            _state["hook"] = None

    _state["hook"] = register_module_forward_pre_hook(first_forward)


def take() -> dict[str, float]:
    """`{METRIC: seconds}` once the model has run (else {}); resets the clock for the next job."""
    start, first = _state["start"], _state["first"]
    _clear()
    return {METRIC: round(first - start, 3)} if start is not None and first is not None else {}


def _clear() -> None:
    if _state["hook"] is not None:
        _state["hook"].remove()
    _state.update(start=None, first=None, hook=None)

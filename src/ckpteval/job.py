"""The one job runner: every job (a single `python run.py`, each job of a scan, each watcher evaluation) goes
through it.

    validate_config(cfg)                      # every range and choice, the device: before anything is allocated
    with stop_signals():                      # SIGTERM / SIGHUP / SIGINT -> JobStopped in the main thread
        result = run_tracked(cfg, fn, job, ...)  # open the run, call the mode, log, end the run, publish results

A run ends FINISHED only when the mode returned and its metrics, artifacts and end reached the store; then
(and only then) `results.json` is moved into the run dir. An exception ends it FAILED, a stop signal KILLED;
a store that fails mid-job sends the rest to the outbox (``ckpteval.tracking.outbox``) and the job ends with a
``TrackingError`` saying where the results wait.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ckpteval.errors import CkptEvalError

log = logging.getLogger("ckpteval")


class JobStopped(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGHUP/SIGINT: a KeyboardInterrupt, so no `except Exception`
    swallows it and the job's MLflow run ends KILLED."""


@dataclass
class Job:
    """What a mode gets besides its config: where it runs, where it writes, the MLflow run to log into."""

    dist: Any  # ckpteval.parallel.dist.DistContext
    out_dir: Path
    run: Any = None  # ckpteval.tracking.Run (an inactive one when tracking is off or on ranks > 0)
    # Filled by the mode for the result header and MLflow tags; `step` is the x-axis of every metric.
    step: int | None = None

    def __post_init__(self) -> None:
        if self.run is None:
            from ckpteval.tracking.run import Run

            self.run = Run()

    def log(self, msg: str, *args) -> None:
        if self.dist.is_main:
            log.info(msg, *args)


# ---------------------------------------------------------------------------------------------- signals


@contextmanager
def stop_signals() -> Iterator[None]:
    """Turn SIGTERM (timeout, SLURM preemption, systemctl stop), SIGHUP (closed terminal) and SIGINT into
    `JobStopped` in the main thread, so every open run ends KILLED instead of staying RUNNING. A second signal
    while the first unwinds is ignored (the first is already ending the job).

    A signal that lands while Python runs a weakref callback or `__del__` (a library's cleanup during model
    loading) raises `JobStopped` there, where Python swallows it ("Exception ignored in ...") and the job would
    run on until SIGKILL. Swallowed exceptions reach `sys.unraisablehook`: ours sends the signal again, so the
    stop is raised in the main thread's own code."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import os
    import sys

    stopping: list[str] = []
    swallowed = threading.Event()

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if stopping and not swallowed.is_set():
            return
        if not stopping:
            stopping.append(name)
            log.warning("%s: stopping the job (its MLflow run ends KILLED)", name)
        swallowed.clear()
        raise JobStopped(name)

    def unraisable(info) -> None:
        if isinstance(info.exc_value, JobStopped):
            swallowed.set()
            signum = signal.Signals[stopping[0]] if stopping else signal.SIGTERM
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        previous_hook(info)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------- validation

# (key, check, requirement): every numeric range of the config, checked before any work.
RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("eval.batch_size", lambda v: v >= 1, "1 or more, or auto"),
    ("eval.seq_len", lambda v: v >= 1, "1 or more"),
    ("eval.steps", lambda v: v == -1 or v >= 1, "1 or more, or -1 for one full pass"),
    ("eval.interval", lambda v: v >= 1, "1 or more"),
    ("eval.logits_chunk", lambda v: v >= 0, "0 (auto) or more"),
    ("eval.doc_sep_id", lambda v: v is None or v >= 0, "a token id (0 or more) or null"),
    ("train.steps", lambda v: v >= 1, "1 or more"),
    ("train.batch_size", lambda v: v >= 1, "1 or more"),
    ("train.seq_len", lambda v: v >= 1, "1 or more"),
    ("train.grad_accum", lambda v: v >= 1, "1 or more"),
    ("train.lr", lambda v: v > 0 and math.isfinite(v), "a positive number"),
    ("train.min_lr_ratio", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("train.warmup_steps", lambda v: v >= 0, "0 or more"),
    ("train.weight_decay", lambda v: v >= 0, "0 or more"),
    ("train.log_interval", lambda v: v >= 1, "1 or more"),
    ("checkpoint.keep_last", lambda v: v >= 0, "0 (keep all) or more"),
    ("harness.batch_size", lambda v: v >= 1, "1 or more, or auto"),
    ("harness.limit", lambda v: v is None or v > 0, "a positive count, a fraction below 1, or null for all"),
    ("harness.num_fewshot", lambda v: v is None or v >= 0, "0 or more, or null for each task's default"),
    ("parallel.tp", lambda v: v >= 1, "1 or more"),
    ("parallel.pp", lambda v: v >= 1, "1 or more"),
    ("parallel.dp", lambda v: v == -1 or v >= 1, "1 or more, or -1 for the rest of the world size"),
    ("parallel.microbatches", lambda v: v >= 1, "1 or more"),
    ("data.num_proc", lambda v: v >= 1, "1 or more"),
    ("tracking.timeout_s", lambda v: v > 0, "a positive number of seconds"),
    ("prepare.vocab_size", lambda v: v >= 1, "1 or more"),
    ("prepare.val_fraction", lambda v: 0 < v < 1, "between 0 and 1 (exclusive)"),
    ("prepare.max_chars", lambda v: v >= 1, "1 or more"),
]


def validate_config(cfg: DictConfig) -> None:
    """Every check that needs nothing but the config: ranges, the pipeline schedule, the device."""
    for key, ok, requirement in RANGES:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            raise CkptEvalError(f"{key}={value} is out of range: use {requirement} ({key}=N)")
        if isinstance(value, float) and not math.isfinite(value):
            raise CkptEvalError(f"{key}={value} is not a finite number: use {requirement}")
    from ckpteval.config import PP_SCHEDULES

    schedule = OmegaConf.select(cfg, "parallel.pp_schedule")
    if schedule is not None and str(schedule) not in PP_SCHEDULES:
        raise CkptEvalError(f"parallel.pp_schedule={schedule} is unknown: use one of {', '.join(PP_SCHEDULES)}")
    check_device(OmegaConf.select(cfg, "eval.device"))
    from ckpteval.evaluation.auto_batch import check_config

    check_config(cfg)  # batch_size=auto, memory budgets, eval.compile


def check_device(requested: str | None) -> None:
    """`eval.device` names a device this torch build has (cuda on a CPU-only build is one line, not a trace)."""
    if not requested:
        return
    import torch

    try:
        dev = torch.device(requested)
    except (RuntimeError, ValueError):
        raise CkptEvalError(f"eval.device={requested} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CkptEvalError(f"eval.device={requested}, but this torch build sees no CUDA device (torch "
                                f"{torch.__version__}): use eval.device=cpu, or install a CUDA build of torch on "
                                f"a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CkptEvalError(f"eval.device={requested}: only {torch.cuda.device_count()} CUDA device(s) are "
                                f"visible: use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type not in ("cpu", "mps", "xpu", "meta") or dev.type == "meta":
        raise CkptEvalError(f"eval.device={requested} cannot run an evaluation: use cpu, cuda or cuda:N")


# ---------------------------------------------------------------------------------------------- one run


def run_tracked(cfg: DictConfig, fn: Callable[[Job], dict[str, Any] | None], job: Job, *, run_name: str,
                tags: dict[str, Any], params: dict[str, str] | None, title: str,
                tracking_cfg=None) -> dict[str, Any] | None:
    """Open the job's run, call `fn(job)`, log its result, end the run, and only then publish results.json.

    Rank 0 tracks; the other ranks run `fn` with an inactive run. A `TrackingError` leaves the results in the
    outbox (raised after the run's end was recorded there); any other exception ends the run FAILED, a stop
    signal KILLED."""
    from ckpteval.results import publish, report
    from ckpteval.tracking import mlflow_run

    tracking_cfg = tracking_cfg if tracking_cfg is not None else cfg.tracking
    with mlflow_run(tracking_cfg, enabled=job.dist.is_main, run_name=run_name, tags=tags, params=params) as run:
        job.run = run
        result = fn(job)
        if not job.dist.is_main or result is None:
            return result
        staged = report(result, title=title, run=run, out_dir=job.out_dir, step=job.step)
        run.set_tags({"step": job.step})
        final = job.out_dir / "results.json"
        if run.active:
            run.end("FINISHED", results=(staged, final))  # raises TrackingError when the store went away
    publish(staged, job.out_dir)
    return result


def evaluation_fn(kind: str) -> Callable[..., dict[str, Any]]:
    """The per-checkpoint evaluation of a kind (`loss`, `harness`): what the watcher runs for each pair.
    Imported here, so the watcher does not import the modes (no modes <-> watch import cycle)."""
    import importlib

    module, fn = {"loss": ("ckpteval.modes.loss", "evaluate_checkpoint_loss"),
                  "harness": ("ckpteval.modes.harness", "evaluate_checkpoint_harness")}[kind]
    return getattr(importlib.import_module(module), fn)

"""The one owner of every run's life: a single `python run.py`, each job of a scan, each watcher evaluation, and a
scan's parent run all start, stop and end here.

    validate_config(cfg)                         # every range and the device: before anything is allocated
    with stop_signals():                         # SIGTERM / SIGHUP / SIGINT -> JobStopped in the main thread
        result = run_tracked(cfg, fn, job, ...)  # open the run, call the mode, log, end the run, publish results
    run_scan(tracking_cfg, name, tags, body)     # a scan's parent run around its jobs and summary
    exit_with(exc)                               # the one `error:` line and exit code of every failure

A run ends FINISHED only when the mode returned and its metrics, artifacts and end reached the store; then
(and only then) `results.json` is moved into the run dir. An exception ends it FAILED, a stop signal KILLED
(``tracking.mlflow_run`` is the one place a run is ended); a store that fails mid-job sends the rest to the
outbox (``ckpteval.tracking.outbox``) and the job ends with ``TrackingOutbox`` (exit 3) saying where the results
wait. Exit codes: 0 done, 1 a scan finished with failed jobs, 2 a user error (`error: ...`), 3 results in the
outbox, 128+N stopped by signal N.

Modes are not imported here: `app.MODES` names them, and `modes/watch.py` hands the watcher its evaluations.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from omegaconf import DictConfig, OmegaConf

from ckpteval.errors import CkptEvalError, TrackingOutbox

log = logging.getLogger("ckpteval")


class JobStopped(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGHUP/SIGINT (its text is the signal's name): a KeyboardInterrupt, so
    no `except Exception` swallows it and the run it interrupts ends KILLED."""


EXIT_JOBS_FAILED = 1  # a scan finished, and some of its jobs failed (its summary lists them)
EXIT_USER_ERROR = 2  # bad input: nothing ran, nothing half-written
EXIT_TRACKING_OUTBOX = 3  # the evaluation finished but the store went away: results wait in the outbox


@dataclass
class Job:
    """What a mode gets besides its config: where it runs, where it writes, the MLflow run to log into."""

    dist: Any  # ckpteval.parallel.dist.DistContext
    out_dir: Path
    run: Any = None  # ckpteval.tracking.Run (an inactive one when tracking is off or on ranks > 0)
    # Filled by the mode for the result header and MLflow tags; `step` is the x-axis of every metric.
    step: int | None = None
    # Called on rank 0 once the run ended FINISHED and results.json is published (the result store drops the
    # job's entries there: ckpteval.evaluation.result_store.drop_when_finished).
    on_finished: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.run is None:
            from ckpteval.tracking.run import Run

            self.run = Run()

    def log(self, msg: str, *args) -> None:
        if self.dist.is_main:
            log.info(msg, *args)


# ---------------------------------------------------------------------------------------------- signals


@dataclass
class Stop:
    """What the stop signals of a `stop_signals()` block did: `event` is set by the first one, `reason` is its
    name. While `raising` (the whole block by default; inside `interruptible()` for the watcher) a signal also
    raises `JobStopped` in the main thread; otherwise it only sets `event` and the owner's `wake` events."""

    raising: bool = True
    doing: str = "the job (its MLflow run ends KILLED)"  # said in the log line of the first signal
    wake: list[threading.Event] = field(default_factory=list)
    event: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None

    @property
    def stopped(self) -> bool:
        return self.event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, or until a stop; True when stopped."""
        return self.event.wait(seconds)

    def request(self, reason: str) -> bool:
        """Record a stop (a signal, or an embedding caller); True for the first one."""
        first = not self.event.is_set()
        if first:
            self.reason = reason
            self.event.set()
        for wake in self.wake:
            wake.set()
        return first

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block a signal aborts with `JobStopped` (the watcher's evaluations); one that a stop already requested
        does not start."""
        if self.stopped:
            raise JobStopped(self.reason or "stop")
        previous, self.raising = self.raising, True
        try:
            yield
        finally:
            self.raising = previous


@contextmanager
def stop_signals(stop: Stop | None = None) -> Iterator[Stop]:
    """Turn SIGTERM (timeout, SLURM preemption, systemctl stop), SIGHUP (closed terminal) and SIGINT into a stop:
    `JobStopped` in the main thread while `stop.raising` (so every open run ends KILLED instead of staying
    RUNNING), else only `stop.event` and its `wake` events (the watcher between evaluations exits at its next
    look). A second signal while the first unwinds is ignored (the first is already ending the job). Blocks nest
    (a scan's jobs, the watcher inside its job): the innermost handles the signals, the outer one's come back.

    A signal that lands while Python runs a weakref callback or `__del__` (a library's cleanup during model
    loading) raises `JobStopped` there, where Python swallows it ("Exception ignored in ...") and the job would
    run on until SIGKILL. Swallowed exceptions reach `sys.unraisablehook`: ours sends the signal again, so the
    stop is raised in the main thread's own code."""
    stop = stop if stop is not None else Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # embedded use: no handlers; `stop.request()` still stops the owner
        return
    import os
    import sys

    swallowed = threading.Event()

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        first = stop.request(name)
        if first:
            log.warning("%s: stopping %s", name, stop.doing)
        if not stop.raising or (not first and not swallowed.is_set()):
            return
        swallowed.clear()
        raise JobStopped(name)

    def unraisable(info) -> None:
        if isinstance(info.exc_value, JobStopped):
            swallowed.set()
            signum = signal.Signals[stop.reason] if stop.reason in signal.Signals.__members__ else signal.SIGTERM
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        previous_hook(info)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield stop
    finally:
        sys.unraisablehook = previous_hook
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------- outcomes


def exit_code(exc: BaseException) -> int:
    """The exit code of a job (or scan) that ended with `exc`: the one mapping (see the module docstring)."""
    if isinstance(exc, JobStopped):
        name = str(exc)
        return 128 + (signal.Signals[name].value if name in signal.Signals.__members__ else signal.SIGTERM.value)
    if isinstance(exc, TrackingOutbox):
        return EXIT_TRACKING_OUTBOX
    if isinstance(exc, CkptEvalError):
        return EXIT_USER_ERROR
    return EXIT_JOBS_FAILED


def outcome_line(exc: BaseException) -> str:
    """The one line a failure prints: `error: ...` for a user error, `stopped by SIGTERM: ...` for a stop."""
    if isinstance(exc, JobStopped):
        return f"stopped by {exc}: its MLflow run(s) ended KILLED, nothing was marked done"
    return f"error: {exc}"


def print_outcome(exc: BaseException) -> None:
    """Print the line once per job: under torchrun, errors every rank shares (config errors before the process
    group exists, failures gathered by `fail_together`) are printed by rank 0 only; a rank's own error keeps its
    rank in the line."""
    import os
    import sys

    rank = int(os.environ.get("RANK", "0"))
    initialized = False
    if "torch" in sys.modules:
        import torch.distributed as tdist

        initialized = tdist.is_available() and tdist.is_initialized()
    shared = getattr(exc, "all_ranks", False) or not initialized
    if rank == 0:
        print(outcome_line(exc), file=sys.stderr, flush=True)
    elif not shared:
        print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
    else:
        import time

        # torchrun ends every rank as soon as one exits: give rank 0 the moment it needs to print the line
        time.sleep(float(os.environ.get("CKPTEVAL_ERROR_GRACE_S", "2")))


def exit_with(exc: BaseException) -> NoReturn:
    """Print the failure's one line and exit with its code."""
    import sys

    print_outcome(exc)
    sys.exit(exit_code(exc))


def in_multirun(config: DictConfig | None = None) -> bool:
    """True inside a `-m` sweep (where exiting from a job would end every remaining job too); `config` is a
    composed config with its `hydra` node, else the running job's Hydra config is asked."""
    if config is not None:
        mode = OmegaConf.select(config, "hydra.mode")
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            mode = HydraConfig.get().mode if HydraConfig.initialized() else None
        except (ImportError, ValueError):
            return False
    return str(mode).endswith("MULTIRUN")


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
    ("signal.last_k", lambda v: v >= 1, "1 or more"),
    ("signal.low_snr", lambda v: v >= 0, "0 or more"),
    ("signal.max_metrics", lambda v: v >= 1, "1 or more"),
    ("ui.port", lambda v: 1 <= v <= 65535, "a port number between 1 and 65535"),
    ("ui.timeout_s", lambda v: v > 0, "a positive number of seconds"),
]


def validate_config(cfg: DictConfig) -> None:
    """Every check that needs nothing but the config: ranges, the extra held-out sets, the device (choices are
    Enums: refused while composing)."""
    for key, ok, requirement in RANGES:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            raise CkptEvalError(f"{key}={value} is out of range: use {requirement} ({key}=N)")
        if isinstance(value, float) and not math.isfinite(value):
            raise CkptEvalError(f"{key}={value} is not a finite number: use {requirement}")
    if OmegaConf.select(cfg, "eval.sets"):  # each set against the DataConfig schema (config.EvalConfig.sets)
        from ckpteval.data import check_eval_sets

        check_eval_sets(cfg)
    check_device(OmegaConf.select(cfg, "eval.device"))
    model_name = OmegaConf.select(cfg, "signal.model_name", default=None)
    if model_name is not None:
        from ckpteval.tracking.registry import check_model_name

        check_model_name(str(model_name))
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
    for hook in job.on_finished:
        hook()
    return result


# ---------------------------------------------------------------------------------------------- a scan's parent

T = TypeVar("T")


def run_scan(tracking_cfg, *, name: str, tags: dict[str, Any], body: Callable[[Any], T]) -> T:
    """A scan's parent run around `body(parent)`, which launches the jobs (each nests under `parent.run_id`) and
    logs the summary to it. Like a job's run it ends FINISHED when `body` returns, FAILED when it raises, KILLED
    on a stop signal (each job's own run ends first, in its job). An earlier job's outbox is replayed first."""
    from ckpteval.tracking import mlflow_run, replay_outbox

    with stop_signals(Stop(doing="the scan (its MLflow runs end KILLED)")):
        if tracking_cfg.enabled:
            replay_outbox(tracking_cfg)
        with mlflow_run(tracking_cfg, enabled=True, run_name=name, tags={"ckpteval.sweep": "true", **tags}) as parent:
            if parent.active:
                log.info("MLflow parent run %s (%s): each job's run nests under it", name, parent.run_id)
            return body(parent)

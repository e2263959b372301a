"""The one place that dispatches: set up the process, open the job's MLflow run, call the mode, report.

Modes are plain functions `run(cfg, job) -> dict` in `ckpteval.modes.*`; they compose blocks (checkpoint,
data, evaluation, parallel, training) and return the job's result. Everything around them (distributed init,
the MLflow run, results.json, the one-line errors) lives here so no mode repeats it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ckpteval import startup
from ckpteval.errors import CkptEvalError, TrackingError
from ckpteval.job import Job, JobStopped, run_tracked, stop_signals, validate_config

log = logging.getLogger("ckpteval")
EXIT_USER_ERROR = 2  # bad input: nothing ran, nothing half-written
EXIT_TRACKING = 3  # the evaluation finished but the store went away: results wait in the outbox


@dataclass(frozen=True)
class ModeSpec:
    target: str  # "module:function"
    opens_run: bool = True  # False: the mode manages MLflow itself (watch, replay) or logs nothing (prepare)
    needs_ckpt: bool = False

    def load(self) -> Callable[[DictConfig, Job], dict[str, Any]]:
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)


MODES: dict[str, ModeSpec] = {
    "train_eval": ModeSpec("ckpteval.modes.train_eval:run"),
    "loss": ModeSpec("ckpteval.modes.loss:run", needs_ckpt=True),
    "harness": ModeSpec("ckpteval.modes.harness:run", needs_ckpt=True),
    "convert": ModeSpec("ckpteval.modes.convert:run", needs_ckpt=True),
    "prepare": ModeSpec("ckpteval.modes.prepare:run", opens_run=False),
    "watch": ModeSpec("ckpteval.modes.watch:run", opens_run=False),
    "replay": ModeSpec("ckpteval.app:replay", opens_run=False),
}

__all__ = ["MODES", "Job", "main", "run_name"]


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Run one job; user errors become one `error: ...` line on stderr and exit code 2 (3: results in the
    outbox because the tracking store went away)."""
    _quiet_libraries()
    try:
        with stop_signals():
            return _main(cfg)
    except CkptEvalError as exc:
        _print_error(exc)
        log.debug("details", exc_info=True)
        shutdown()
        if _in_multirun():
            raise  # Hydra records the job FAILED; the sweep goes on and its summary lists the error
        sys.exit(EXIT_TRACKING if isinstance(exc, TrackingError) and "outbox" in str(exc) else EXIT_USER_ERROR)
    except JobStopped as exc:
        shutdown()
        print(f"stopped by {exc}: the job's MLflow run is KILLED, nothing was marked done", file=sys.stderr,
              flush=True)
        if _in_multirun():
            raise
        sys.exit(128 + {"SIGTERM": 15, "SIGHUP": 1, "SIGINT": 2}.get(str(exc), 15))


def shutdown() -> None:
    """End the process group, if this job started one (torch is not even imported for a config error)."""
    if "torch" in sys.modules:
        from ckpteval.parallel import dist

        dist.shutdown()


def _print_error(exc: CkptEvalError) -> None:
    """One `error:` line per job: under torchrun, errors every rank shares (config errors before the process
    group exists, failures gathered by `fail_together`) are printed by rank 0 only; a rank's own error keeps
    its rank in the line."""
    rank = int(os.environ.get("RANK", "0"))
    initialized = False
    if "torch" in sys.modules:
        import torch.distributed as tdist

        initialized = tdist.is_available() and tdist.is_initialized()
    shared = getattr(exc, "all_ranks", False) or not initialized
    if rank == 0:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    elif not shared:
        print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
    else:
        import time

        # torchrun ends every rank as soon as one exits: give rank 0 the moment it needs to print the line
        time.sleep(float(os.environ.get("CKPTEVAL_ERROR_GRACE_S", "2")))


def _main(cfg: DictConfig) -> dict[str, Any] | None:
    startup.job_started()  # time/startup_seconds: this job's start to its first request
    name = str(cfg.mode.name)
    if cfg.tracking.replay:
        name = "replay"
    spec = MODES.get(name)
    if spec is None:
        raise CkptEvalError(f"unknown mode {name!r}: choose one of {', '.join(MODES)} (mode=NAME)")
    _reject_glob_without_multirun(cfg.ckpt)
    if spec.needs_ckpt and not cfg.ckpt:
        raise CkptEvalError(f"mode={name} needs a checkpoint: add ckpt=PATH (an HF dir, a DCP step_N dir "
                            f"or a .gguf file)")
    validate_config(cfg)
    if spec.opens_run or name == "watch":
        _check_store(cfg.tracking)
    if name == "replay":
        return replay(cfg, None)
    log.info("%s: starting%s", name, f" on {cfg.ckpt}" if cfg.ckpt else "")
    from ckpteval.parallel.dist import init_distributed

    dist = init_distributed(cfg.parallel, cfg.eval.device)
    job = Job(dist=dist, out_dir=_shared_out_dir(dist))
    try:
        if dist.is_main and spec.opens_run:
            _replay_quietly(cfg.tracking)
        fn = spec.load()
        if not spec.opens_run:
            result = fn(cfg, job)
            if dist.is_main and name != "watch":
                print(f"results: {job.out_dir}", flush=True)
            return result
        job.step = _step_from_path(cfg.ckpt)
        from ckpteval.tracking import flatten

        resolved = OmegaConf.to_container(cfg, resolve=True)
        result = run_tracked(
            cfg, lambda j: fn(cfg, j), job,
            run_name=cfg.tracking.run_name or run_name(name, cfg.ckpt, job.step),
            tags={"mode": name, "ckpt": _abs(cfg.ckpt), "step": job.step}, params=flatten(resolved),
            title=f"{name} {cfg.ckpt or ''}".strip())
        if dist.is_main and cfg.tracking.enabled and not cfg.tracking.parent_run_id:  # a scan links at its end
            from ckpteval.tracking import print_view
            from ckpteval.tracking.naming import table_metrics

            print_view(job.run, cfg.tracking, table_metrics(result) if isinstance(result, dict) else None)
        return result
    finally:
        shutdown()
        _delete_downloads()


def replay(cfg: DictConfig, _job) -> dict[str, Any]:
    """`mode=replay` (or tracking.replay=true): deliver what the outbox holds to the store, then exit."""
    from ckpteval.tracking import outbox_dir, replay_outbox, resolve_tracking_uri
    from ckpteval.tracking.store import server_answers

    uri = resolve_tracking_uri(cfg.tracking.uri)
    if not server_answers(uri, cfg.tracking.timeout_s):
        raise CkptEvalError(f"tracking server {uri} is still unreachable: the outbox {outbox_dir(cfg.tracking)} "
                            f"keeps its results; start the server (or fix tracking.uri) and run mode=replay again")
    n = replay_outbox(cfg.tracking)
    print(f"replay: {n} run(s) completed from {outbox_dir(cfg.tracking)} to {uri}", flush=True)
    return {"replayed": n}


def _check_store(tracking_cfg) -> None:
    """A store that cannot work (sqlite path under a file, not a database, read-only; a server that does not
    answer) is one error line within a second, before torch is even imported (rank 0 only: it alone logs)."""
    if not tracking_cfg.enabled or int(os.environ.get("RANK", "0")) != 0:
        return
    from ckpteval.tracking import check_reachable, resolve_tracking_uri

    check_reachable(resolve_tracking_uri(tracking_cfg.uri), tracking_cfg.timeout_s)


def _replay_quietly(tracking_cfg) -> None:
    """Deliver an earlier job's outbox before this job's run opens (never fails the job)."""
    if not tracking_cfg.enabled:
        return
    from ckpteval.tracking import replay_outbox

    try:
        replay_outbox(tracking_cfg)
    except CkptEvalError:
        raise
    except Exception:
        log.warning("replaying the tracking outbox failed", exc_info=True)


def _delete_downloads() -> None:
    """The job's copies of s3://... checkpoints (checkpoint.remote; kept with CKPTEVAL_KEEP_DOWNLOADS=1)."""
    from ckpteval.checkpoint.remote import cleanup

    cleanup()


def run_name(mode: str, ckpt: str | None, step: int | None) -> str:
    """`loss@1200` (tracking/naming.py): short enough for the MLflow runs table."""
    from ckpteval.tracking.naming import job_run_name

    return job_run_name(mode, ckpt, step)


def _step_from_path(ckpt: str | None) -> int | None:
    if not ckpt:
        return None
    from ckpteval.checkpoint import parse_step

    return parse_step(ckpt)


def _abs(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path and "://" not in path else path


def _shared_out_dir(dist) -> Path:
    """Rank 0's run dir on every rank: each rank's Hydra resolves its own `${now:...}`, and a shared path (the
    default checkpoint dir of an FSDP training run) must not depend on which second a rank started in."""
    from ckpteval.results import job_output_dir

    out = job_output_dir()
    if not dist.distributed:
        return out
    import torch.distributed as tdist

    box = [str(out)]
    tdist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _in_multirun() -> bool:
    """True inside a `-m` sweep job (where exiting would end every remaining job too)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def _reject_glob_without_multirun(ckpt: str | None) -> None:
    if isinstance(ckpt, str) and ckpt.startswith("glob:"):
        raise CkptEvalError(f"ckpt={ckpt} is a pattern: add -m to scan every match as its own job "
                            f"(python run.py -m ckpt='{ckpt}' ...)")


def _quiet_libraries() -> None:
    """Keep stdout readable: our log lines and the result, not every library's warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported (lazily)
    for name in ("alembic", "mlflow", "urllib3", "datasets", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Every DCP load in one process says this; it is the intended use, not news to the user.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled, unavailable or uninitialized.*")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()

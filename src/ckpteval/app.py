"""The one place that dispatches: set up the process, hand the mode to the job runner, report.

Modes are plain functions `run(cfg, job) -> dict` in `ckpteval.modes.*`; they compose blocks (checkpoint,
data, evaluation, parallel, training) and return the job's result. What surrounds them (distributed init, the
MLflow run, results.json) is set up here and run by `ckpteval.job`, which also owns the one-line errors and exit
codes, so no mode repeats it.
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
from ckpteval.config import ModeName
from ckpteval.errors import CkptEvalError
from ckpteval.job import (
    Job,
    JobStopped,
    exit_code,
    in_multirun,
    print_outcome,
    run_tracked,
    stop_signals,
    validate_config,
)

log = logging.getLogger("ckpteval")


@dataclass(frozen=True)
class ModeSpec:
    target: str  # "module:function"
    opens_run: bool = True  # False: the mode manages MLflow itself (watch, replay) or logs nothing (prepare)
    needs_ckpt: bool = False

    def load(self) -> Callable[[DictConfig, Job], dict[str, Any]]:
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)


MODES: dict[str, ModeSpec] = {  # one entry per config.ModeName (tests check the two agree)
    "train_eval": ModeSpec("ckpteval.modes.train_eval:run"),
    "loss": ModeSpec("ckpteval.modes.loss:run", needs_ckpt=True),
    "harness": ModeSpec("ckpteval.modes.harness:run", needs_ckpt=True),
    "convert": ModeSpec("ckpteval.modes.convert:run", needs_ckpt=True),
    "prepare": ModeSpec("ckpteval.modes.prepare:run", opens_run=False),
    "watch": ModeSpec("ckpteval.modes.watch:run", opens_run=False),
    "replay": ModeSpec("ckpteval.app:replay", opens_run=False),
    "compare": ModeSpec("ckpteval.modes.compare:run"),
    "ui": ModeSpec("ckpteval.modes.ui:run", opens_run=False),
}

__all__ = ["MODES", "Job", "main", "run_name"]


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Run one job; a user error or a stop becomes one line on stderr and its exit code (`ckpteval.job`: 2 bad
    input, 3 results in the outbox because the tracking store went away, 128+N stopped by signal N)."""
    _quiet_libraries()
    try:
        with stop_signals():
            return _main(cfg)
    except (CkptEvalError, JobStopped) as exc:
        multirun = in_multirun()
        if not (multirun and isinstance(exc, JobStopped)):  # a stop ends the whole scan: the sweeper says so
            print_outcome(exc)
        log.debug("details", exc_info=True)
        shutdown()
        if multirun:
            raise  # Hydra records the job FAILED and the scan goes on (its summary lists the error), or stops
        sys.exit(exit_code(exc))


def shutdown() -> None:
    """End the process group, if this job started one (torch is not even imported for a config error)."""
    if "torch" in sys.modules:
        from ckpteval.parallel import dist

        dist.shutdown()


def _main(cfg: DictConfig) -> dict[str, Any] | None:
    startup.job_started()  # time/startup_seconds: this job's start to its first request
    name = str(ModeName.replay if cfg.tracking.replay else cfg.mode.name)  # an Enum: composed, so in MODES
    spec = MODES[name]
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
            if dist.is_main and name not in ("watch", "ui"):
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
            from ckpteval.metrics import table_metrics
            from ckpteval.tracking import print_view

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

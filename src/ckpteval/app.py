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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from ckpteval.errors import CkptEvalError
from ckpteval.parallel.dist import DistContext, init_distributed, shutdown
from ckpteval.results import job_output_dir, report
from ckpteval.tracking import Run, flatten, mlflow_run, resolve_tracking_uri, ui_command

log = logging.getLogger("ckpteval")


@dataclass(frozen=True)
class ModeSpec:
    target: str  # "module:function"
    opens_run: bool = True  # False: the mode manages MLflow itself (watch) or logs nothing (prepare)
    needs_ckpt: bool = False

    def load(self) -> Callable[[DictConfig, "Job"], dict[str, Any]]:
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)


MODES: dict[str, ModeSpec] = {
    "train_eval": ModeSpec("ckpteval.modes.train_eval:run"),
    "loss": ModeSpec("ckpteval.modes.loss:run", needs_ckpt=True),
    "harness": ModeSpec("ckpteval.modes.harness:run", needs_ckpt=True),
    "convert": ModeSpec("ckpteval.modes.convert:run", needs_ckpt=True),
    "prepare": ModeSpec("ckpteval.modes.prepare:run", opens_run=False),
    "watch": ModeSpec("ckpteval.modes.watch:run", opens_run=False),
}


@dataclass
class Job:
    """What a mode gets besides its config: where it runs, where it writes, the MLflow run to log into."""

    dist: DistContext
    out_dir: Path
    run: Run = field(default_factory=Run)
    # Filled by the mode for the result header and MLflow tags; `step` is the x-axis of every metric.
    step: int | None = None

    def log(self, msg: str, *args) -> None:
        if self.dist.is_main:
            log.info(msg, *args)


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Run one job; user errors become one `error: ...` line on stderr and exit code 2."""
    _quiet_libraries()
    try:
        return _main(cfg)
    except CkptEvalError as exc:
        _print_error(exc)
        log.debug("details", exc_info=True)
        shutdown()
        if _in_multirun():
            raise  # Hydra records the job FAILED; the sweep goes on and its summary lists the error
        sys.exit(2)


def _print_error(exc: CkptEvalError) -> None:
    """One `error:` line per job: under torchrun, errors every rank shares (config errors before the process
    group exists, failures gathered by `fail_together`) are printed by rank 0 only; a rank's own error keeps
    its rank in the line."""
    import torch.distributed as tdist

    rank = int(os.environ.get("RANK", "0"))
    shared = getattr(exc, "all_ranks", False) or not (tdist.is_available() and tdist.is_initialized())
    if rank == 0:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    elif not shared:
        print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
    else:
        import time

        # torchrun ends every rank as soon as one exits: give rank 0 the moment it needs to print the line
        time.sleep(float(os.environ.get("CKPTEVAL_ERROR_GRACE_S", "2")))


def _main(cfg: DictConfig) -> dict[str, Any] | None:
    spec = MODES.get(cfg.mode.name)
    if spec is None:
        raise CkptEvalError(f"unknown mode {cfg.mode.name!r}: choose one of {', '.join(MODES)} (mode=NAME)")
    _reject_glob_without_multirun(cfg.ckpt)
    if spec.needs_ckpt and not cfg.ckpt:
        raise CkptEvalError(f"mode={cfg.mode.name} needs a checkpoint: add ckpt=PATH (an HF dir, a DCP step_N dir "
                            f"or a .gguf file)")
    dist = init_distributed(cfg.parallel, cfg.eval.device)
    job = Job(dist=dist, out_dir=_shared_out_dir(dist))
    fn = spec.load()
    try:
        if not spec.opens_run:
            return fn(cfg, job)
        job.step = _step_from_path(cfg.ckpt)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        name = cfg.tracking.run_name or run_name(cfg.mode.name, cfg.ckpt, job.step)
        with mlflow_run(cfg.tracking, enabled=dist.is_main, run_name=name,
                        tags={"mode": cfg.mode.name, "ckpt": _abs(cfg.ckpt), "step": job.step},
                        params=flatten(resolved)) as run:
            job.run = run
            result = fn(cfg, job)
            if dist.is_main and result is not None:
                report(result, title=f"{cfg.mode.name} {cfg.ckpt or ''}".strip(), run=run, out_dir=job.out_dir,
                       step=job.step)
                run.set_tags({"step": job.step})
        if dist.is_main and cfg.tracking.enabled:
            print(f"MLflow: {ui_command(resolve_tracking_uri(cfg.tracking.uri))}", flush=True)
        return result
    finally:
        shutdown()


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


def _shared_out_dir(dist: DistContext) -> Path:
    """Rank 0's run dir on every rank: each rank's Hydra resolves its own `${now:...}`, and a shared path (the
    default checkpoint dir of an FSDP training run) must not depend on which second a rank started in."""
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
    for name in ("alembic", "mlflow", "urllib3", "datasets", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass

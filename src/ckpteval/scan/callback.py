"""The per-job half of a scan, as a Hydra callback (`hydra.callbacks.sweep` in conf/config.yaml): it runs in each
job's own process whatever the launcher (in-process, joblib, SLURM through submitit).

- `on_job_start`: under submitit with several tasks per job, export what torchrun would, so parallel=fsdp|tp|pp
  works on SLURM;
- `on_job_end`: write `job_status.json` (status, result or error, overrides) into the job dir, which the summary
  reads back (`scan.summary.load_records`), then freeze what survived the job for the collector.

The scan's parent run and its summary belong to the sweeper (`hydra_plugins/ckpteval_sweeper`, through
`ckpteval.job.run_scan`): one owner for the parent's whole life.
"""

from __future__ import annotations

import gc
import json
import os
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ckpteval.errors import CkptEvalError

STATUS_FILE = "job_status.json"


def error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CkptEvalError) else f"{type(exc).__name__}: {exc}"


def export_submitit_torch_env() -> bool:
    """Under submitit with several tasks per job (hydra/launcher=slurm, tasks_per_node=G), each task is one rank:
    export what torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) so parallel=fsdp|tp|pp works."""
    if os.environ.get("SUBMITIT_EXECUTOR") not in ("slurm", "local") or "RANK" in os.environ:
        return False
    try:
        import submitit
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return False
    if submitit.JobEnvironment().num_tasks <= 1:
        return False
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # we pick cuda:LOCAL_RANK ourselves
    return True


def freeze_survivors() -> None:
    """After a job of a scan: collect its garbage, then move everything still alive (imported modules, and the
    tasks, requests and token memos kept for the next checkpoint) to the collector's permanent generation.
    Each later full collection (the one after a checkpoint's evaluation, Python's own) then walks only what
    the next job allocates, not the millions of objects torch, transformers, lm-eval and MLflow hold: ~0.5 s
    per checkpoint less. A frozen object that dies later is still freed by reference counting; only a cycle
    among frozen objects waits for the `gc.unfreeze()` at the scan's end."""
    gc.collect()
    gc.freeze()


def write_status(config: DictConfig, job_return: Any) -> Path:
    """`job_status.json` in the job's run dir: what the summary needs of this job."""
    from hydra.core.utils import JobStatus

    completed = job_return.status == JobStatus.COMPLETED
    value = job_return._return_value  # `.return_value` re-raises a failed job's exception
    record = {
        "job": int(config.hydra.job.num),
        "status": "COMPLETED" if completed else "FAILED",
        "overrides": list(job_return.overrides or []),
        "ckpt": OmegaConf.select(config, "ckpt"),
        "mode": OmegaConf.select(config, "mode.name"),
        "result": value if completed and isinstance(value, dict) else None,
        "error": None if completed else error_text(value),
        "traceback": None if completed or not isinstance(value, BaseException)
        else "".join(traceback.format_exception(type(value), value, value.__traceback__))[-8000:],
    }
    out = Path(str(config.hydra.runtime.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    path = out / STATUS_FILE
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


class SweepCallback(Callback):
    """Per-job status files and the submitit environment (see the module docstring)."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        export_submitit_torch_env()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from ckpteval.job import in_multirun

        if not in_multirun(config):
            return
        if os.environ.get("RANK", "0") == "0":
            write_status(config, job_return)
        freeze_survivors()

"""How a job's result leaves the process: the result block, one JSON line on stdout, `results.json` in the
Hydra run dir, and the same metrics + artifacts in the job's MLflow run (rank 0 only).

`results.json` is written to a staging path first (`.pending/results.json` in the run dir) and moved into
place by the job runner only after the MLflow run is FINISHED, so a results.json always means "complete and
tracked"; when the store went away the outbox keeps the staged file and its replay moves it into place."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ckpteval.metrics import measured
from ckpteval.tracking.run import Run

STAGING = ".pending"


def job_output_dir() -> Path:
    """The Hydra run dir of this job (cwd when called outside Hydra, e.g. from tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ValueError, ImportError):
        return Path.cwd()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def result_block(title: str, result: dict[str, Any]) -> str:
    width = max(len(k) for k in result) if result else 0
    lines = [f"== {title} " + "=" * max(0, 60 - len(title))]
    lines += [f"  {k:<{width}}  {_fmt(v)}" for k, v in result.items()]
    return "\n".join(lines)


def report(result: dict[str, Any], *, title: str, run: Run, out_dir: Path, step: int | None,
           artifacts: dict[str, Path] | None = None) -> Path:
    """Log, print and stage one job's result; returns the staged results.json (see `publish`)."""
    staging = out_dir / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    path = staging / "results.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    run.log_metrics(measured(result), step=step)
    run.log_artifact(path)
    hydra_dir = out_dir / ".hydra"
    if hydra_dir.is_dir():
        run.log_artifact(hydra_dir, ".hydra")
    for name, art in (artifacts or {}).items():
        run.log_artifact(art, name)
    print(result_block(title, result), flush=True)
    print(json.dumps(result, default=str), flush=True)
    return path


def publish(staged: Path, out_dir: Path) -> Path:
    """Move a staged results.json into the run dir (atomic), once its run is FINISHED."""
    final = out_dir / "results.json"
    staged.replace(final)
    try:
        staged.parent.rmdir()
    except OSError:
        pass
    print(f"results: {final}", flush=True)
    return final

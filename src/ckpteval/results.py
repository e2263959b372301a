"""How a job's result leaves the process: the result block, one JSON line on stdout, `results.json` in the
Hydra run dir, and the same metrics + artifacts in the job's MLflow run (rank 0 only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ckpteval.tracking import Run


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
    """Print, save and log one job's result; returns the results.json path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    run.log_metrics({k: v for k, v in result.items() if k not in ("step", "tokens_seen")}, step=step)
    run.log_artifact(path)
    hydra_dir = out_dir / ".hydra"
    if hydra_dir.is_dir():
        run.log_artifact(hydra_dir, ".hydra")
    for name, art in (artifacts or {}).items():
        run.log_artifact(art, name)
    print(result_block(title, result), flush=True)
    print(json.dumps(result, default=str), flush=True)
    return path

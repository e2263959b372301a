"""`mode=compare`: signal or noise over finished evaluation runs, read back from MLflow: no model is loaded.

    python run.py mode=compare compare.experiments=[runs-a,runs-b]          # every checkpoint evaluated there
    python run.py mode=compare compare.parents=[<scan parent run id>]        # the jobs of one or more scans
    python run.py mode=compare compare.runs=[<run id>,<run id>,...] signal.last_k=3

Checkpoints are grouped into runs by their run dir (the dir that holds `step_N`, or the parent of `checkpoints/`),
exactly as a scan groups them, and the same numbers come out: per metric and run the last-k mean, noise and tau;
across runs the signal, SNR, leader and its paired test on the runs' last checkpoints (from the jobs' per-sample
artifacts: lm-eval's sample logs, `window_nll.npz` of mode=loss); the best checkpoint by `signal.select`. Printed as the scan prints them, written to `summary.csv` and
`signal.png` in the run dir, and logged to this job's own MLflow run. See docs/signal.md.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from ckpteval.errors import CkptEvalError
from ckpteval.evaluation.signal_report import Point, SignalSummary
from ckpteval.series import signal_settings

log = logging.getLogger("ckpteval.compare")


def run(cfg, job) -> dict[str, Any]:
    c = cfg.compare
    experiments, parents, run_ids = list(c.experiments or []), list(c.parents or []), list(c.runs or [])
    if not (experiments or parents or run_ids):
        raise CkptEvalError("mode=compare needs finished runs to compare: compare.experiments=[NAME,...], "
                            "compare.parents=[SCAN_PARENT_RUN_ID,...] or compare.runs=[RUN_ID,...]")
    if not job.dist.is_main:
        return {}
    from ckpteval.tracking import series
    from ckpteval.tracking.store import make_client, resolve_tracking_uri

    client = make_client(resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.timeout_s)
    records = series.evaluation_records(client, experiment_ids=series.experiment_ids(client, experiments),
                                        parent_ids=parents, run_ids=run_ids)
    if not records:
        raise CkptEvalError(f"mode=compare found no finished checkpoint evaluation in {_what(c)}: evaluate "
                            "checkpoints first (mode=loss|harness, a -m scan, or the watcher)")
    settings = signal_settings(cfg)
    with tempfile.TemporaryDirectory(prefix="ckpteval_compare_") as tmp:
        def samples_dir(point: Point) -> str | None:
            return series.download_samples(client, point.run_id, Path(tmp)) if point.run_id else None

        summary = SignalSummary.build(records, last_k=settings["last_k"], select=settings["select"],
                                      low_snr=settings["low_snr"], samples_dir=samples_dir)
    if settings["select"] and summary.best is None:
        raise CkptEvalError(summary.notes[0])
    job.log("compare: %d evaluation run(s) of %d training run(s) from %s", len(records), len(summary.runs), _what(c))
    print(summary.table(settings["max_metrics"]), flush=True)
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = summary.write_csv(records, out / "summary.csv")
    png = summary.plot(out / "signal.png", "compare: signal vs noise", settings["max_metrics"])
    print(f"summary: {csv_path}" + (f", {png}" if png else ""), flush=True)
    for path in (csv_path, png):
        if path is not None:
            job.run.log_artifact(path, "summary")
    job.run.set_tags({**summary.tags(), "mlflow.note.content": summary.markdown(settings["max_metrics"])})
    return summary.metrics()


def _what(c) -> str:
    parts = [f"experiments {list(c.experiments)}" if c.experiments else "",
             f"parent runs {list(c.parents)}" if c.parents else "", f"runs {list(c.runs)}" if c.runs else ""]
    return ", ".join(p for p in parts if p)

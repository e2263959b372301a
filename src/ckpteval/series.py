"""Signal or noise for the two places a series of checkpoints ends up: a scan's summary and the watcher's summary run.

    found = scan_signal(records, config)            # after the scan table: prints the signal block
    found.write(sweep_dir / "summary.csv", sweep_dir / "signal.png")
    note = found.finish(parent_run)                 # parent metrics + tags, per-run numbers, best registered
    watcher_signal(ledger_entries, cfg, summary_run, watch_dir)    # after each watcher evaluation

The numbers come from `ckpteval.evaluation.signal_report` (formulas in `ckpteval.evaluation.signal`); MLflow
calls go through `ckpteval.tracking` (series: the scan's child runs; registry: the `best` alias).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpteval.evaluation.signal_report import PREFIX, SignalSummary

log = logging.getLogger("ckpteval.signal")


def signal_settings(cfg) -> dict[str, Any]:
    """`signal.*` of a composed config (defaults when the group is missing: an older config snapshot)."""
    from omegaconf import OmegaConf

    s = OmegaConf.select(cfg, "signal", default=None) or {}
    get = s.get if hasattr(s, "get") else (lambda k, d=None: d)
    return {"last_k": int(get("last_k", 5)), "select": get("select", None), "low_snr": float(get("low_snr", 2.0)),
            "register": bool(get("register", True)), "model_name": get("model_name", None),
            "max_metrics": int(get("max_metrics", 16))}


def _build(records: list[dict], settings: dict[str, Any], **kw) -> SignalSummary:
    return SignalSummary.build(records, last_k=settings["last_k"], select=settings["select"],
                               low_snr=settings["low_snr"], **kw)


# ---------------------------------------------------------------------------------------------- scans


@dataclass
class ScanSignal:
    summary: SignalSummary
    records: list[dict]
    settings: dict[str, Any]
    artifacts: list[Path] = field(default_factory=list)

    def write(self, csv_path: Path, png_path: Path | None) -> list[Path]:
        """The signal columns appended to the scan's summary.csv, and signal.png beside it (png_path: None, none)."""
        runs = {str(r["job"]): r["run"] for r in self.records}
        self.summary.add_csv_columns(csv_path, lambda row: runs.get(str(row.get("job"))))
        png = self.summary.plot(png_path, f"{Path(csv_path).parent.name}: signal vs noise",
                                self.settings["max_metrics"]) if png_path is not None else None
        self.artifacts = [png] if png else []
        return self.artifacts

    def finish(self, parent_run) -> str:
        """Log the numbers to the parent run (and each training run's numbers to its jobs' runs when there are
        several), register the best checkpoint; the markdown for the parent's note."""
        from ckpteval.tracking import series

        summary = self.summary
        last = max((p.step for ms in summary.metrics_.values() for pts in ms.series.values() for p in pts), default=0)
        parent_run.log_metrics(summary.metrics(), step=int(last))
        parent_run.set_tags(summary.tags())
        children = series.child_records(parent_run)
        by_ckpt: dict[str, list[dict]] = {}
        for c in children:
            by_ckpt.setdefault(_key(c["ckpt"]), []).append(c)
        if summary.multi and children:
            per_run = {}
            for r in self.records:
                for child in by_ckpt.get(_key(r["ckpt"]), []):
                    run_metrics = summary.run_metrics(r["run"])
                    if run_metrics:
                        per_run[child["run_id"]] = (run_metrics, int(r["step"]))
            series.log_to_runs(parent_run.client, per_run)
            series.tag_runs(parent_run.client, {rid: {"signal.run": summary.names[r["run"]]} for r in self.records
                                         for rid in [c["run_id"] for c in by_ckpt.get(_key(r["ckpt"]), [])]})
        note = summary.markdown(self.settings["max_metrics"])
        line = register(summary, self.settings, parent_run, children)
        if line:
            print(line, flush=True)
            note += f"\n\n{line}"
        return note


def _key(path: str | None) -> str:
    if not path or "://" in path:
        return path or ""
    return str(Path(path).expanduser().resolve())


def scan_signal(records: list, config) -> ScanSignal | None:
    """The signal block of a scan (JobRecords of ckpteval.sweep), printed; None when no completed job has a step
    (or the block failed: the scan's own summary never depends on it)."""
    try:
        return _scan_signal(records, config)
    except Exception as exc:  # the scan's own summary never depends on this block
        log.warning("the signal summary of this scan failed: %s", exc, exc_info=True)
        return None


def _scan_signal(records: list, config) -> ScanSignal | None:
    from ckpteval.tracking.series import training_run_of

    settings = signal_settings(config)
    plain = [{"run": training_run_of(r.ckpt), "step": r.step, "ckpt": r.ckpt, "metrics": r.metrics,
              "samples": r.run_dir, "job": r.job}
             for r in records if r.status == "COMPLETED" and r.ckpt and r.step is not None]
    if not plain:
        return None
    summary = _build(plain, settings)
    if not summary.metrics_:
        return None
    print(summary.table(settings["max_metrics"]), flush=True)
    return ScanSignal(summary, plain, settings)


# ---------------------------------------------------------------------------------------------- registry


def register(summary: SignalSummary, settings: dict[str, Any], run, candidates: list[dict]) -> str | None:
    """Register the summary's best checkpoint (signal.register) in `run`'s store; `candidates`: records with the
    MLflow run id of each evaluation (the one that logged the selection metric is the version's run)."""
    best = summary.best
    if best is None or not settings["register"] or not run.active or run.offline is not None:
        return None
    from ckpteval.tracking.registry import model_name_for, register_best
    from ckpteval.tracking.series import experiment_of

    run_id = best.point.run_id
    if run_id is None:
        run_id = next((c["run_id"] for c in reversed(candidates) if _key(c["ckpt"]) == _key(best.point.ckpt)
                       and best.metric in c["metrics"]), None)
    try:
        name = model_name_for(experiment_of(run), settings["model_name"])
        return register_best(run.client, name, ckpt=best.point.ckpt or "", step=int(best.point.step),
                             metric=best.metric, value=best.smoothed, lower=summary.metrics_[best.metric].lower,
                             k=best.k, run_id=run_id)
    except Exception as exc:  # noqa: BLE001 - registering is a convenience: never fail the scan or watcher for it
        log.warning("could not register the best checkpoint: %s", exc)
        return f"best checkpoint not registered: {exc}"


# ---------------------------------------------------------------------------------------------- watcher


def watcher_records(entries: dict[str, dict], watch_dir: str) -> list[dict]:
    """The watcher ledger's done evaluations as records of one run (the watched dir), oldest first."""
    out = []
    for e in sorted(entries.values(), key=lambda e: e.get("time", 0)):
        if e.get("status") == "done" and e.get("metrics") and e.get("step") is not None:
            out.append({"run": watch_dir, "step": e["step"], "ckpt": e.get("ckpt"),
                        "metrics": {k: v for k, v in e["metrics"].items() if k not in ("step", "tokens_seen")},
                        "run_id": e.get("run_id")})
    return out


_registered: dict[str, str] = {}  # summary run id -> last best checkpoint registered (no repeat calls per poll)


def watcher_signal(entries: dict[str, dict], cfg, summary_run, watch_dir: str) -> SignalSummary | None:
    """Recompute the series after a watcher evaluation: `signal/...` on the watcher's summary run (at the latest
    step), and the best checkpoint registered when it changed."""
    records = watcher_records(entries, watch_dir)
    if not records or not summary_run.active:
        return None
    settings = signal_settings(cfg)
    summary = _build(records, settings)
    if not summary.metrics_:
        return None
    latest = max(int(r["step"]) for r in records)
    summary_run.log_metrics(summary.metrics(), step=latest)
    summary_run.set_tags(summary.tags())
    best = summary.best
    if best is not None and _registered.get(summary_run.run_id) != f"{best.point.ckpt}@{best.smoothed!r}":
        line = register(summary, settings, summary_run, records)
        if line:
            log.info("%s", line)
            _registered[summary_run.run_id] = f"{best.point.ckpt}@{best.smoothed!r}"
    return summary


__all__ = ["PREFIX", "ScanSignal", "scan_signal", "signal_settings", "watcher_signal"]

"""A scan's summary: one row per job and per skipped checkpoint, the best checkpoint per metric, p-values against
it, on stdout, in `summary.csv` / `summary.png` in the sweep dir, and on the scan's MLflow parent run.

    records = load_records(sweep_dir, since=started, skipped=skipped)   # job_status.json files + skipped matches
    summarize(records, sweep_dir, parent)                               # table, CSV, plot, parent run's metrics

Every matched checkpoint is accounted for: a match that was no complete checkpoint (still being written, a
corrupt file) is a SKIPPED row with its reason, and the table's closing line counts every match
(`5 checkpoint(s): 3 completed, 1 failed, 1 skipped`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ckpteval.metrics import is_finite_number, lower_is_better, measured
from ckpteval.metrics import key_metrics as measuring
from ckpteval.scan.callback import STATUS_FILE
from ckpteval.scan.expand import PARENT_KEY, Skipped, natural_key

log = logging.getLogger("ckpteval.sweep")
MAX_TABLE_METRICS = 6  # metric columns of the stdout table and the parent run's description


class RecordStatus(str, Enum):
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"  # the job ran and raised (or never wrote its status)
    SKIPPED = "SKIPPED"  # matched, but no complete checkpoint: never a job

    __str__ = str.__str__


@dataclass
class JobRecord:
    job: int | None  # the Hydra job number; None for a skipped checkpoint
    status: RecordStatus
    ckpt: str | None
    step: int | None
    mode: str | None
    variant: str  # the job's overrides other than the checkpoint: what distinguishes its curve
    metrics: dict[str, float] = field(default_factory=dict)
    tokens_seen: int | None = None
    error: str | None = None  # the job's error, or why the checkpoint was skipped
    run_dir: str | None = None

    @property
    def completed(self) -> bool:
        return self.status == RecordStatus.COMPLETED

    @property
    def failed(self) -> bool:
        return self.status == RecordStatus.FAILED


def _status(text: Any) -> RecordStatus:
    return RecordStatus.COMPLETED if text == "COMPLETED" else RecordStatus.FAILED


# ------------------------------------------------------------------------------------------ records


def _set_variants(records: list[JobRecord], overrides: dict[int, list[str]]) -> None:
    """A job's variant = its overrides that differ between jobs, the checkpoint aside (`mode=harness`)."""
    parsed = {job: dict(o.split("=", 1) if "=" in o else (o, "") for o in ovs) for job, ovs in overrides.items()}
    keys = dict.fromkeys(k for d in parsed.values() for k in d if k.lstrip("+~") not in ("ckpt", PARENT_KEY))
    varying = [k for k in keys if len({d.get(k) for d in parsed.values()}) > 1]
    for r in records:
        d = parsed.get(r.job, {})
        r.variant = " ".join(f"{k}={d[k]}" for k in varying if k in d)


def load_records(sweep_dir: Path, since: float = 0.0, skipped: list[Skipped] = ()) -> list[JobRecord]:
    """The job_status.json files this scan's jobs wrote (older ones in a reused sweep dir are ignored), and a
    SKIPPED record per skipped match; in order of variant, then step."""
    from ckpteval.checkpoint import parse_step

    latest: dict[int, dict] = {}
    for path in sorted(Path(sweep_dir).rglob(STATUS_FILE)):
        if ".submitit" in path.parts or path.stat().st_mtime < since - 1:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        data["run_dir"] = str(path.parent)
        latest[int(data.get("job", -1))] = data
    records, overrides = [], {}
    for num, data in sorted(latest.items()):
        overrides[num] = list(data.get("overrides") or [])
        result = data.get("result") or {}
        ckpt = data.get("ckpt")
        step = result.get("step") if is_finite_number(result.get("step")) else (parse_step(ckpt) if ckpt else None)
        records.append(JobRecord(
            job=num, status=_status(data.get("status")), ckpt=ckpt, step=step, mode=data.get("mode"), variant="",
            metrics={k: float(v) for k, v in measured(result).items() if is_finite_number(v)},
            tokens_seen=result.get("tokens_seen"), error=data.get("error"), run_dir=data["run_dir"]))
    _set_variants(records, overrides)
    records += [JobRecord(job=None, status=RecordStatus.SKIPPED, ckpt=s.ckpt, step=parse_step(s.ckpt), mode=None,
                          variant="", error=s.reason) for s in dict.fromkeys(skipped)]
    records.sort(key=lambda r: (r.variant, r.step is None, r.step or 0, natural_key(r.ckpt or "")))
    return records


# ------------------------------------------------------------------------------------------ judging


def key_metrics(records: list[JobRecord]) -> list[str]:
    """Metrics that measure the checkpoint (not token counts or stderrs), in the order the jobs report them."""
    return measuring(k for r in records for k in r.metrics)


def best_per_metric(records: list[JobRecord], metrics: list[str]) -> dict[str, JobRecord]:
    best: dict[str, JobRecord] = {}
    for metric in metrics:
        done = [r for r in records if r.completed and metric in r.metrics]
        if done:
            pick = min if lower_is_better(metric) else max
            best[metric] = pick(done, key=lambda r: r.metrics[metric])
    return best


def significance(records: list[JobRecord], metrics: list[str]) -> dict[tuple[int, str], tuple[float, int]]:
    """(job, metric) -> (p-value, samples) of each completed job against the best one on the same samples:
    paired t over windows for held-out loss, exact McNemar for harness metrics (evaluation/statistics.py)."""
    from ckpteval.evaluation.statistics import p_value_vs

    out: dict[tuple[int, str], tuple[float, int]] = {}
    for metric, best in best_per_metric(records, metrics).items():
        for r in records:
            if r.completed and metric in r.metrics and r is not best:
                found = p_value_vs(metric, best.run_dir, r.run_dir)
                if found is not None:
                    out[(r.job, metric)] = found
    return out


# ------------------------------------------------------------------------------------------ rendering


def _cell(r: JobRecord, metric: str, best: dict[str, JobRecord], pvalues: dict) -> str:
    """`value`, `value (best)` or `value (p=0.012)`, `value (p=0.31 ns)`: ns = not significant at 0.05."""
    from ckpteval.evaluation.statistics import significant

    text = _fmt(r.metrics.get(metric))
    if (r.job, metric) in pvalues:
        p = pvalues[(r.job, metric)][0]
        return f"{text} (p={p:.2g}{'' if significant(p) else ' ns'})"
    if best.get(metric) is r and any(m == metric for _, m in pvalues):
        return f"{text} (best)"
    return text


def _short_names(records: list[JobRecord]) -> list[str]:
    """Checkpoint paths relative to the dir they share (step_100, or run1/step_100 across runs), per record."""
    paths = [r.ckpt for r in records if r.ckpt]
    try:
        root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    except ValueError:  # relative and absolute mixed
        root = ""
    return [os.path.relpath(r.ckpt, root) if root and r.ckpt else (r.ckpt or "-") for r in records]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def count_line(records: list[JobRecord]) -> str:
    """Every matched checkpoint accounted for: `5 checkpoint(s): 3 completed, 1 failed, 1 skipped`; when several
    jobs share a checkpoint (mode=loss,harness), `4 checkpoint(s): 6 job(s) (5 completed, 1 failed), 1 skipped`."""
    jobs = [r for r in records if r.status != RecordStatus.SKIPPED]
    done, failed = sum(r.completed for r in jobs), sum(r.failed for r in jobs)
    skipped = len(records) - len(jobs)
    checkpoints = len({r.ckpt for r in records})
    if checkpoints == len(records):  # one job per checkpoint
        return f"{checkpoints} checkpoint(s): {done} completed, {failed} failed, {skipped} skipped"
    return f"{checkpoints} checkpoint(s): {len(jobs)} job(s) ({done} completed, {failed} failed), {skipped} skipped"


def fixed_cost_line(records: list[JobRecord]) -> str | None:
    """`fixed cost per job: 3.1 s median, 2.8-4.0 s (time/startup_seconds over 4 job(s))`: each job's start (its
    process's start for the first job of a process, as every SLURM job is) to its first request."""
    import statistics

    from ckpteval.startup import METRIC

    values = sorted(r.metrics[METRIC] for r in records if r.completed and METRIC in r.metrics)
    if not values:
        return None
    return (f"fixed cost per job: {statistics.median(values):.2f} s median, {values[0]:.2f}-{values[-1]:.2f} s "
            f"({METRIC}: the job's start to its first request, over {len(values)} job(s))")


def summary_table(records: list[JobRecord], max_metrics: int = MAX_TABLE_METRICS, pvalues: dict | None = None) -> str:
    """The stdout summary: one row per job (p-value against the best checkpoint on the same samples where the
    jobs saved them) and per skipped checkpoint, the best checkpoint per metric, the failed jobs and their
    errors, the skipped checkpoints and why; the closing line counts every match (`count_line`)."""
    metrics = key_metrics(records)
    shown = metrics[:max_metrics]
    names = _short_names(records)
    pvalues = significance(records, shown) if pvalues is None else pvalues
    best_of = best_per_metric(records, shown)
    variants = len({r.variant for r in records}) > 1
    header = ["job", "checkpoint", "step"] + (["variant"] if variants else []) + shown + ["status"]
    rows = [[_fmt(r.job), name, _fmt(r.step)] + ([r.variant or "-"] if variants else [])
            + [_cell(r, m, best_of, pvalues) for m in shown] + [str(r.status)] for r, name in zip(records, names)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    jobs = [r for r in records if r.status != RecordStatus.SKIPPED]
    lines = [f"== sweep summary: {len(jobs)} job(s), {sum(r.completed for r in jobs)} completed, "
             f"{sum(r.failed for r in jobs)} failed " + "=" * 20]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    best = best_per_metric(records, metrics)
    if best:
        lines.append("best checkpoint per metric:")
        width = max(len(m) for m in best)
        for metric, r in best.items():
            arrow = "lowest" if lower_is_better(metric) else "highest"
            where = f" [{r.variant}]" if variants and r.variant else ""
            lines.append(f"  {metric:<{width}}  {_fmt(r.metrics[metric])} ({arrow}) at step {_fmt(r.step)}: "
                         f"{r.ckpt}{where}")
    if pvalues:
        lines.append("p: paired test against the best checkpoint on the same samples (loss: t-test over windows; "
                     "benchmarks: exact McNemar); ns = not significant at 0.05")
    for title, status, fallback in (("failed jobs:", RecordStatus.FAILED, "unknown error"),
                                    ("skipped checkpoints (not complete):", RecordStatus.SKIPPED, "incomplete")):
        listed = [(r, name) for r, name in zip(records, names) if r.status == status]
        if listed:
            lines.append(title)
            lines += [f"  {'#' + str(r.job) + ' ' if r.job is not None else ''}{name}: "
                      f"{(r.error or fallback).splitlines()[0]}" for r, name in listed]
    if len(metrics) > len(shown):
        lines.append(f"({len(metrics) - len(shown)} more metric(s) in summary.csv)")
    fixed = fixed_cost_line(records)
    if fixed:
        lines.append(fixed)
    lines.append(count_line(records))  # the closing line: every match, skipped ones included
    return "\n".join(lines)


def write_csv(records: list[JobRecord], path: Path, pvalues: dict | None = None) -> Path:
    """Every metric of every job; for metrics with per-sample data, `METRIC p_vs_best` and `METRIC significant`
    (p < 0.05 against the best job on the same samples; empty for the best job itself). Skipped checkpoints
    are rows with status SKIPPED and the reason in `error`."""
    from ckpteval.evaluation.statistics import significant

    metrics = list(dict.fromkeys(k for r in records for k in r.metrics))
    pvalues = significance(records, metrics) if pvalues is None else pvalues
    tested = [m for m in metrics if any(k[1] == m for k in pvalues)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "checkpoint", "step", "tokens_seen", "mode", "variant", "status", *metrics,
                         *[f"{m} {c}" for m in tested for c in ("p_vs_best", "significant")], "error", "run_dir"])
        for r in records:
            stats = []
            for m in tested:
                p = pvalues.get((r.job, m), (None,))[0]
                stats += ["" if p is None else p, "" if p is None else significant(p)]
            writer.writerow([r.job, r.ckpt, r.step, r.tokens_seen, r.mode, r.variant, str(r.status),
                             *[r.metrics.get(m, "") for m in metrics], *stats, (r.error or "")[:2000], r.run_dir])
    return path


def plot_metrics(records: list[JobRecord], path: Path, title: str, max_metrics: int = 8) -> Path | None:
    """One panel per key metric, value vs checkpoint step, a line per variant, the best point starred; failed
    jobs and skipped checkpoints as dotted lines at their steps."""
    metrics = [m for m in key_metrics(records)
               if any(r.step is not None and m in r.metrics for r in records)][:max_metrics]
    if not metrics:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no summary.png (pip install 'ckpteval[sweep]')")
        return None
    best = best_per_metric(records, metrics)
    variants = list(dict.fromkeys(r.variant for r in records if not r.status == RecordStatus.SKIPPED))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7.5, 2.4 * len(metrics) + 0.6), sharex=True, squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        for variant in variants:
            points = sorted((r.step, r.metrics[metric]) for r in records
                            if r.variant == variant and r.step is not None and metric in r.metrics)
            if points:
                ax.plot(*zip(*points), marker="o", label=variant or None)
        for status, color in ((RecordStatus.FAILED, "grey"), (RecordStatus.SKIPPED, "orange")):
            marked = [r for r in records if r.status == status and r.step is not None]
            for i, r in enumerate(marked):
                ax.axvline(r.step, color=color, linestyle=":", linewidth=1,
                           label=str(status).lower() if i == 0 else None)
        b = best.get(metric)
        if b is not None and b.step is not None:
            ax.scatter([b.step], [b.metrics[metric]], marker="*", s=180, color="crimson", zorder=3,
                       label=f"best: step {b.step}")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("checkpoint step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_markdown(records: list[JobRecord], max_metrics: int = MAX_TABLE_METRICS,
                     pvalues: dict | None = None) -> str:
    """The table as markdown, for the parent run's description in the MLflow UI (p-values as in the table;
    a skipped checkpoint's reason in its status cell)."""
    metrics = key_metrics(records)[:max_metrics]
    names = _short_names(records)
    pvalues = significance(records, metrics) if pvalues is None else pvalues
    best = best_per_metric(records, metrics)

    def status(r: JobRecord) -> str:
        reason = (r.error or "").splitlines()[0][:200].replace("|", "/") if r.error else ""
        return f"{r.status}: {reason}" if r.status == RecordStatus.SKIPPED and reason else str(r.status)

    lines = [f"{count_line(records)}\n", "| job | checkpoint | step | " + " | ".join(metrics) + " | status |",
             "|" + "---|" * (len(metrics) + 4)]
    lines += [f"| {_fmt(r.job)} | {name} | {_fmt(r.step)} | "
              + " | ".join(_cell(r, m, best, pvalues) for m in metrics) + f" | {status(r)} |"
              for r, name in zip(records, names)]
    if pvalues:
        lines.append("\np: paired test against the best checkpoint on the same samples; ns = not significant at 0.05")
    fixed = fixed_cost_line(records)
    if fixed:
        lines.append(f"\n{fixed}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the end of a scan


def summarize(records: list[JobRecord], sweep_dir: Path, parent, *, config=None, plot: bool = True,
              max_table_metrics: int = MAX_TABLE_METRICS) -> None:
    """Print the table, write summary.csv (+ summary.png), the signal-vs-noise block over the series
    (`ckpteval.series`, with the scan's `config`), and log them, the curves, the best checkpoint per metric and
    the counts to the parent run (`parent` is inactive when tracking is off). Ending the parent is not done
    here: `ckpteval.job.run_scan` ends it."""
    pvalues = significance(records, key_metrics(records))
    print(summary_table(records, max_table_metrics, pvalues), flush=True)
    csv_path = write_csv(records, sweep_dir / "summary.csv", pvalues)
    png = plot_metrics(records, sweep_dir / "summary.png", f"{sweep_dir.name}: metric vs checkpoint step") \
        if plot else None
    pictures = [png] if png else []
    signal = None
    if config is not None:
        from ckpteval.series import scan_signal  # signal vs noise over the series: its table, CSV columns, picture

        signal = scan_signal(records, config)
        if signal is not None:
            pictures += signal.write(csv_path, sweep_dir / "signal.png" if plot else None)
    print(f"summary: {csv_path}" + "".join(f", {p}" for p in pictures), flush=True)
    if parent.active:
        _log_to_parent(parent, records, [csv_path] + pictures, pvalues, max_table_metrics, signal)


def _log_to_parent(run, records: list[JobRecord], artifacts: list[Path], pvalues: dict, max_metrics: int,
                   signal=None) -> None:
    for path in artifacts:
        run.log_artifact(path, "summary")
    metrics = key_metrics(records)
    done = [r for r in records if r.completed and r.step is not None]
    # The parent's own history is the training curve when each (metric, step) occurs once (a plain scan).
    pairs = [(m, r.step) for r in done for m in r.metrics]
    if len(pairs) == len(set(pairs)):
        for r in done:
            run.log_metrics(r.metrics, step=r.step)
    best = best_per_metric(records, metrics)
    for metric, r in best.items():
        # "summary/..." sorts after "eval": the UI's first chart section stays the eval curve
        run.log_metrics({f"summary/best/{metric}": r.metrics[metric]}, step=r.step)
    by_job = {r.job: r for r in records if r.job is not None}
    for (job, metric), (p, _) in pvalues.items():  # p of each checkpoint vs the best, at its step
        run.log_metrics({f"summary/p_vs_best/{metric}": p}, step=by_job[job].step)
    from ckpteval.tracking.naming import publish_view

    publish_view(run, metrics[:max_metrics])
    skipped = [r for r in records if r.status == RecordStatus.SKIPPED]
    signal_note = signal.finish(run) if signal is not None else ""  # ckpteval.series: numbers, registry
    run.set_tags({"sweep.jobs": len(records) - len(skipped), "sweep.failed": sum(r.failed for r in records),
                  "sweep.skipped": len(skipped),
                  **{f"best_ckpt/{m}": r.ckpt for m, r in best.items()},
                  "mlflow.note.content": summary_markdown(records, max_metrics, pvalues)
                  + (f"\n\n{signal_note}" if signal_note else "")})

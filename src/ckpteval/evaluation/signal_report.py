"""Signal or noise over a series of checkpoints, as a scan, the watcher and `mode=compare` show it.

    summary = SignalSummary.build(records, last_k=5)   # records: [{"run", "step", "ckpt", "metrics", ...}, ...]
    print(summary.table())                             # per metric: each run's last-k mean, noise, tau; signal, SNR
    summary.metrics()                                  # {"signal/eval/loss/noise": ...} (one run) or signal/snr (several)
    summary.plot(Path("signal.png"))                   # one panel per metric, each run's curve and its last-k band

A record is one evaluated checkpoint: `run` (the training run it belongs to: the dir that holds its checkpoints),
`step`, `ckpt`, `metrics` (flat, as a job returns them), and optionally `samples` (a dir holding the job's per-sample
files, for the paired test) and `run_id` (its MLflow run). The formulas are in `ckpteval.evaluation.signal`;
this module picks the metrics, groups the series, and renders them. Metric names keep their slashes:
the noise of `eval/loss` is `signal/eval/loss/noise`.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpteval.evaluation import signal as sn
from ckpteval.metrics import is_bookkeeping, lower_is_better  # the one direction rule (losses, bits, errors: lower)

log = logging.getLogger("ckpteval.signal")

PREFIX = "signal"
SELECT_DEFAULTS = ("harness/core", "harness/mean_primary", "eval/loss")  # signal.select=null: the first present
# Besides bookkeeping (counts, stderrs, timings: metrics.is_bookkeeping), `harness/{task}/primary` is a copy of one
# of the task's own metrics (and of unknown direction: accuracy or perplexity), `/random` the chance level.
_NOT_A_SERIES = re.compile(r"(/primary|/random)$", re.IGNORECASE)


def series_metrics(records: Iterable[dict]) -> list[str]:
    """Metrics that form a series: numbers measuring the checkpoint, in the order the records report them."""
    names = dict.fromkeys(k for r in records for k, v in (r.get("metrics") or {}).items() if _finite(v))
    return [m for m in names if not m.startswith(PREFIX + "/") and m not in ("step", "tokens_seen")
            and not _NOT_A_SERIES.search(m) and not is_bookkeeping(m)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_names(paths: Iterable[str]) -> dict[str, str]:
    """Short, unique display names for run dirs: relative to the working dir when inside it (`runs/a`), else the
    shortest tail of path components that tells them apart."""
    paths = list(dict.fromkeys(paths))
    cwd = os.getcwd()
    out = {}
    for p in paths:
        if os.path.isabs(p) and (p + "/").startswith(cwd.rstrip("/") + "/") and p != cwd:
            out[p] = os.path.relpath(p, cwd)
    rest = [p for p in paths if p not in out]
    for depth in range(1, 64):
        tails = {p: "/".join(Path(p).parts[-depth:]) for p in rest}
        if len(set(tails.values()) | {out[p] for p in out}) == len(tails) + len(out) or depth > 8:
            out.update(tails)
            break
    return out


# ---------------------------------------------------------------------------------------------- the numbers


@dataclass
class Point:
    run: str
    step: float
    ckpt: str | None
    value: float
    samples: str | None = None  # dir with the job's per-sample files (paired tests)
    run_id: str | None = None  # the MLflow run that logged the value


@dataclass
class MetricSignal:
    metric: str
    lower: bool
    series: dict[str, list[Point]]  # run -> points in step order
    runs: dict[str, sn.RunStats]
    signal: float = sn.NAN
    snr: float = sn.NAN
    leader: str | None = None
    p_values: dict[str, tuple[float, int]] = field(default_factory=dict)  # other run -> (p, samples)
    test: str | None = None  # "McNemar" | "paired t"


@dataclass
class Best:
    metric: str
    point: Point
    smoothed: float
    k: int  # checkpoints in its trailing window


@dataclass
class SignalSummary:
    k: int
    runs: list[str]  # run dirs, in the order they first appear
    names: dict[str, str]  # run dir -> display name
    metrics_: dict[str, MetricSignal]
    best: Best | None
    select: str | None
    low_snr: float
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, records: list[dict], last_k: int = 5, select: str | None = None, low_snr: float = 2.0,
              samples_dir: Callable[[Point], str | None] | None = None) -> SignalSummary:
        """Group the records by run and metric, compute every number; `samples_dir(point)` gives the dir with a
        point's per-sample files for the leader's paired test (default: the record's own `samples`)."""
        if last_k < 1:
            raise ValueError(f"signal.last_k must be 1 or more, got {last_k}")
        runs = list(dict.fromkeys(str(r["run"]) for r in records))
        metrics: dict[str, MetricSignal] = {}
        for metric in series_metrics(records):
            by_step: dict[str, dict[float, Point]] = {}
            for r in records:  # a checkpoint evaluated twice: the later record wins
                value = (r.get("metrics") or {}).get(metric)
                if _finite(value) and r.get("step") is not None:
                    by_step.setdefault(str(r["run"]), {})[float(r["step"])] = Point(
                        str(r["run"]), float(r["step"]), r.get("ckpt"), float(value), r.get("samples"),
                        r.get("run_id"))
            series = {run: [pts[s] for s in sorted(pts)] for run, pts in by_step.items()}
            if series:
                metrics[metric] = _metric_signal(metric, series, last_k, samples_dir)
        summary = cls(k=last_k, runs=runs, names=run_names(runs), metrics_=metrics, best=None, select=None,
                      low_snr=float(low_snr))
        summary._choose_best(select)
        return summary

    def _choose_best(self, select: str | None) -> None:
        if select is None:
            select = next((m for m in SELECT_DEFAULTS if m in self.metrics_), None)
            if select is None:
                self.notes.append(f"no best checkpoint: none of {', '.join(SELECT_DEFAULTS)} was logged (choose one "
                                  "with signal.select=METRIC)")
                return
        elif select not in self.metrics_:
            known = ", ".join(list(self.metrics_)[:8]) or "none"
            self.notes.append(f"no best checkpoint: signal.select={select} was not logged by any checkpoint "
                              f"(metrics: {known})")
            return
        self.select = select
        ms = self.metrics_[select]
        candidates = []
        for pts in ms.series.values():
            smoothed = sn.trailing_means([p.value for p in pts], self.k)
            candidates += [(s, p, min(len(pts), self.k)) for s, p in zip(smoothed, pts)]
        i = sn.best_index([c[0] for c in candidates], ms.lower)
        if i is not None:
            s, p, k = candidates[i]
            self.best = Best(select, p, s, k)

    # -- flat numbers (MLflow metrics, results.json)
    @property
    def multi(self) -> bool:
        return len(self.runs) > 1

    def ordered(self) -> list[MetricSignal]:
        """Metrics by SNR, highest first (several runs), else in the order the jobs report them."""
        items = list(self.metrics_.values())
        if self.multi:
            items.sort(key=lambda m: -m.snr if not math.isnan(m.snr) else math.inf)
        return items

    def low(self, ms: MetricSignal) -> bool:
        return self.multi and (math.isnan(ms.snr) or ms.snr < self.low_snr)

    def run_metrics(self, run: str) -> dict[str, float]:
        """One run's `signal/{metric}/{last_k_mean,noise,tau}` (NaN ones left out)."""
        out = {}
        for ms in self.metrics_.values():
            st = ms.runs.get(run)
            if st is not None:
                for name, value in (("last_k_mean", st.last_k_mean), ("noise", st.noise), ("tau", st.tau)):
                    if math.isfinite(value):
                        out[f"{PREFIX}/{ms.metric}/{name}"] = value
        return out

    def metrics(self) -> dict[str, float]:
        """The scan's (or comparison's) own numbers: one run -> its last-k mean, noise and tau per metric; several
        runs -> signal, SNR and the leader's p-value (the largest against any other run) per metric."""
        if not self.multi:
            out = self.run_metrics(self.runs[0]) if self.runs else {}
        else:
            out = {}
            for ms in self.metrics_.values():
                for name, value in (("signal", ms.signal), ("snr", ms.snr)):
                    if math.isfinite(value):
                        out[f"{PREFIX}/{ms.metric}/{name}"] = value
                if ms.p_values:
                    out[f"{PREFIX}/{ms.metric}/leader_p"] = max(p for p, _ in ms.p_values.values())
        if self.best is not None:
            out[f"{PREFIX}/best/{self.best.metric}"] = self.best.smoothed
            out[f"{PREFIX}/best/step"] = self.best.point.step
        return out

    def tags(self) -> dict[str, str]:
        out = {}
        if self.best is not None:
            b = self.best
            out.update({f"{PREFIX}.best.ckpt": b.point.ckpt or "", f"{PREFIX}.best.metric": b.metric,
                        f"{PREFIX}.best.run": self.names.get(b.point.run, b.point.run)})
        if self.multi:
            for ms in self.metrics_.values():
                if ms.leader is not None:
                    out[f"{PREFIX}.leader/{ms.metric}"] = self.names.get(ms.leader, ms.leader)
        return out

    # -- text
    def _best_line(self) -> list[str]:
        if self.best is None:
            return self.notes[:1]
        b = self.best
        name = self.names.get(b.point.run, b.point.run)
        direction = "lowest" if self.metrics_[b.metric].lower else "highest"
        line = (f"best checkpoint by {b.metric} (mean of its last {b.k} checkpoint(s) in its run, {direction}): "
                f"{_fmt(b.smoothed)} at step {_fmt(b.point.step)} of {name}: {b.point.ckpt}")
        return [line]

    def table(self, max_metrics: int = 16) -> str:
        """The summary block printed after the scan table."""
        shown = self.ordered()[:max_metrics]
        head = (f"== signal vs noise: {len(self.runs)} run(s), last k={self.k} checkpoint(s) each (noise = std/|mean| "
                f"of the last k; tau: +1 = better at every checkpoint) ")
        lines = [head + "=" * max(0, 118 - len(head))]
        if self.multi:
            leader = "leader (p: its last checkpoint vs each other run's)"
            header = ["metric", "run", "last-k mean", "noise", "tau", "signal", "SNR", leader]
            rows = []
            for ms in shown:
                for j, run in enumerate(r for r in self.runs if r in ms.runs):
                    st = ms.runs[run]
                    first = j == 0
                    rows.append([ms.metric if first else "", self.names[run], _fmt(st.last_k_mean), _fmt(st.noise),
                                 _signed(st.tau), _fmt(ms.signal) if first else "",
                                 (_fmt(ms.snr) + (" low" if self.low(ms) else "")) if first else "",
                                 self._leader_text(ms) if first else ""])
        else:
            header = ["metric", "last-k mean", "noise", "tau", "checkpoints"]
            rows = [[ms.metric, _fmt(st.last_k_mean), _fmt(st.noise), _signed(st.tau), f"{st.k} of {st.n}"]
                    for ms in shown for st in ms.runs.values()]
        lines += _columns(header, rows)
        if self.multi:
            lines.append(f"signal = (max - min of the runs' last-k means) / their mean; SNR = signal / mean noise; "
                         f"low: SNR < {self.low_snr:g} (signal.low_snr): the runs differ by less than their noise")
        lines += self._best_line()
        if len(self.metrics_) > len(shown):
            lines.append(f"({len(self.metrics_) - len(shown)} more metric(s) in the CSV)")
        return "\n".join(lines)

    def _leader_text(self, ms: MetricSignal) -> str:
        if ms.leader is None:
            return "-"
        text = self.names[ms.leader]
        if ms.p_values:
            ps = ", ".join(f"p={p:.2g} vs {self.names[o]}" for o, (p, _) in ms.p_values.items())
            text += f" ({ps}, {ms.test})"
        return text

    def markdown(self, max_metrics: int = 16) -> str:
        """The same numbers for the parent run's note in the MLflow UI."""
        shown = self.ordered()[:max_metrics]
        lines = [f"### Signal vs noise (last k={self.k} checkpoints per run)", ""]
        if self.multi:
            lines += ["| metric | run | last-k mean | noise | tau | signal | SNR | leader |", "|---" * 8 + "|"]
            for ms in shown:
                for j, run in enumerate(r for r in self.runs if r in ms.runs):
                    st, first = ms.runs[run], j == 0
                    lines.append(f"| {ms.metric if first else ''} | {self.names[run]} | {_fmt(st.last_k_mean)} | "
                                 f"{_fmt(st.noise)} | {_signed(st.tau)} | {_fmt(ms.signal) if first else ''} | "
                                 f"{(_fmt(ms.snr) + (' **low**' if self.low(ms) else '')) if first else ''} | "
                                 f"{self._leader_text(ms) if first else ''} |")
        else:
            lines += ["| metric | last-k mean | noise | tau |", "|---|---|---|---|"]
            lines += [f"| {ms.metric} | {_fmt(st.last_k_mean)} | {_fmt(st.noise)} | {_signed(st.tau)} |"
                      for ms in shown for st in ms.runs.values()]
        lines += ["", *self._best_line()]
        return "\n".join(lines)

    # -- CSV
    def csv_columns(self) -> list[str]:
        cols = ["signal/run"]
        for ms in self.metrics_.values():
            cols += [f"{PREFIX}/{ms.metric}/{n}" for n in ("last_k_mean", "noise", "tau")]
            if self.multi:
                cols += [f"{PREFIX}/{ms.metric}/{n}" for n in ("signal", "snr", "leader")]
        return cols + ["signal/best"]

    def csv_values(self, run: str | None, ckpt: str | None, step: Any) -> dict[str, Any]:
        """The signal columns of one row (a job or checkpoint of `run`): its run's numbers, the cross-run ones, and
        whether it is the best checkpoint."""
        if run is None or run not in self.names:
            return {}
        out: dict[str, Any] = {"signal/run": self.names[run]}
        for ms in self.metrics_.values():
            st = ms.runs.get(run)
            if st is not None:
                out.update({f"{PREFIX}/{ms.metric}/last_k_mean": st.last_k_mean,
                            f"{PREFIX}/{ms.metric}/noise": _blank_nan(st.noise),
                            f"{PREFIX}/{ms.metric}/tau": _blank_nan(st.tau)})
            if self.multi:
                out.update({f"{PREFIX}/{ms.metric}/signal": _blank_nan(ms.signal),
                            f"{PREFIX}/{ms.metric}/snr": _blank_nan(ms.snr),
                            f"{PREFIX}/{ms.metric}/leader": self.names.get(ms.leader, "") if ms.leader else ""})
        b = self.best
        out["signal/best"] = bool(b is not None and b.point.run == run and b.point.ckpt == ckpt
                                  and step is not None and float(step) == b.point.step)
        return out

    def add_csv_columns(self, path: Path, run_of: Callable[[dict], str | None]) -> Path:
        """Append the signal columns to an existing CSV (the scan's summary.csv), row by row; `run_of(row)` names a
        row's run dir."""
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
            fields = list(rows[0].keys()) if rows else []
        cols = self.csv_columns()
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields + [c for c in cols if c not in fields])
            writer.writeheader()
            for row in rows:
                row.update(self.csv_values(run_of(row), row.get("checkpoint"), row.get("step") or None))
                writer.writerow(row)
        return path

    def write_csv(self, records: list[dict], path: Path) -> Path:
        """One row per checkpoint (the metrics of every record of it merged, later records winning; the MLflow runs
        they came from), then the signal columns: mode=compare's summary.csv."""
        merged: dict[tuple, dict] = {}
        for r in records:
            row = merged.setdefault((str(r["run"]), r.get("step")), {"ckpt": r.get("ckpt"), "metrics": {}, "ids": []})
            row["metrics"].update({k: v for k, v in (r.get("metrics") or {}).items() if not k.startswith(PREFIX + "/")})
            row["ids"] += [r["run_id"]] if r.get("run_id") else []
        metrics = list(dict.fromkeys(k for row in merged.values() for k in row["metrics"]))
        cols = self.csv_columns()
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["run", "checkpoint", "step", "run_ids", *metrics, *cols])
            for (run, step), row in sorted(merged.items(), key=lambda kv: (self.runs.index(kv[0][0]), kv[0][1] or 0)):
                values = self.csv_values(run, row["ckpt"], step)
                writer.writerow([self.names.get(run, run), row["ckpt"], step, " ".join(row["ids"]),
                                 *[row["metrics"].get(m, "") for m in metrics], *[values.get(c, "") for c in cols]])
        return path

    # -- picture
    def plot(self, path: Path, title: str = "", max_metrics: int = 12) -> Path | None:
        """One panel per metric (by SNR when several runs): each run's curve, its last-k band (mean +- std over
        the last k checkpoints, drawn over their steps), low-SNR panels marked, the best checkpoint starred."""
        shown = self.ordered()[:max_metrics]
        if not shown:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import numpy as np
        except ImportError:
            log.warning("matplotlib is not installed: no signal.png (pip install 'ckpteval[plot]')")
            return None
        cols = 2 if len(shown) > 3 else 1
        rows = math.ceil(len(shown) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 2.6 * rows + 0.8), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2"])
        for ax in axes.flat[len(shown):]:
            ax.axis("off")
        for ax, ms in zip(axes.flat, shown):
            for i, run in enumerate(r for r in self.runs if r in ms.series):
                pts, st, color = ms.series[run], ms.runs[run], colors[self.runs.index(run) % len(colors)]
                ax.plot([p.step for p in pts], [p.value for p in pts], marker="o", markersize=3, color=color,
                        label=self.names[run] if self.multi else None)
                tail = pts[-st.k:]
                std = float(np.std([p.value for p in tail], ddof=1)) if len(tail) > 1 else 0.0
                ax.fill_between([tail[0].step, tail[-1].step], st.last_k_mean - std, st.last_k_mean + std,
                                color=color, alpha=0.18, linewidth=0)
                ax.hlines(st.last_k_mean, tail[0].step, tail[-1].step, colors=color, linestyles="--", linewidth=1)
            b = self.best
            if b is not None and b.metric == ms.metric:
                ax.scatter([b.point.step], [b.point.value], marker="*", s=160, color="crimson", zorder=3,
                           label=f"best (step {_fmt(b.point.step)})")
            label = ms.metric + (f"   SNR {_fmt(ms.snr)}" if self.multi else
                                 f"   noise {_fmt(ms.runs[self.runs[0]].noise)}  tau {_signed(ms.runs[self.runs[0]].tau)}")
            low = self.low(ms)
            ax.set_title(label + ("   LOW SNR" if low else ""), fontsize=9, color="crimson" if low else "black",
                         loc="left")
            if low:
                for spine in ax.spines.values():
                    spine.set_edgecolor("crimson")
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
        for ax in axes[-1]:
            ax.set_xlabel("checkpoint step", fontsize=8)
        band = f"band: mean +- std of each run's last {self.k} checkpoint(s)"
        fig.suptitle((title + "\n" if title else "") + band + ("; panels by SNR, highest first" if self.multi else ""),
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _metric_signal(metric: str, series: dict[str, list[Point]], k: int,
                   samples_dir: Callable[[Point], str | None] | None) -> MetricSignal:
    lower = lower_is_better(metric)
    stats = {run: sn.run_stats([p.step for p in pts], [p.value for p in pts], k, lower)
             for run, pts in series.items()}
    ms = MetricSignal(metric, lower, series, stats)
    if len(stats) > 1:
        means = {run: st.last_k_mean for run, st in stats.items()}
        ms.signal = sn.relative_spread(list(means.values()))
        ms.snr = sn.signal_to_noise(list(means.values()), [st.noise for st in stats.values()])
        ms.leader = sn.leader(means, lower)
        if ms.leader is not None:
            _paired_tests(ms, samples_dir)
    return ms


def _paired_tests(ms: MetricSignal, samples_dir: Callable[[Point], str | None] | None) -> None:
    """The leader's last checkpoint against each other run's last checkpoint, on the samples both saw."""
    from ckpteval.evaluation.statistics import p_value_vs, paired_test_kind

    kind = paired_test_kind(ms.metric)
    if kind is None:
        return
    where = samples_dir or (lambda p: p.samples)
    best_dir = where(ms.series[ms.leader][-1])
    if not best_dir:
        return
    for run, pts in ms.series.items():
        if run != ms.leader:
            other = where(pts[-1])
            found = p_value_vs(ms.metric, best_dir, other) if other else None
            if found is not None:
                ms.p_values[run] = found
                ms.test = kind


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf"
        if value.is_integer() and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}"
    return str(value)


def _signed(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:+.2f}"


def _blank_nan(value: float) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _columns(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]

"""Checkpoint scans: one job per checkpoint, one MLflow parent run per scan, one summary at the end.

    python run.py -m mode=loss ckpt='glob:outputs/train_eval/*/checkpoints/step_*' data=local ...
    python run.py -m mode=loss,harness ckpt='glob:ckpts/step_*'          # cartesian product: 2 x N jobs
    python run.py +sweep=scan_loss ckpt='glob:ckpts/step_*'               # ready files in multirun_sweeps/

Two halves:
- expansion (used by the sweeper plugin in ``hydra_plugins/ckpteval_sweeper``): a ``key=glob:PATTERN`` value,
  on the command line or in ``hydra.sweeper.params``, becomes one value per complete checkpoint, in step order,
  quoted for Hydra's override grammar (paths with commas, spaces, quotes, ``${``), so it combines with any
  other sweep like a comma list does;
- ``SweepCallback`` (``hydra.callbacks.sweep`` in conf/config.yaml): opens the MLflow parent run every job's
  run nests under, writes ``job_status.json`` into each job dir (launcher-agnostic: it runs where the job runs),
  and at the end prints the summary table and writes ``summary.csv`` / ``summary.png`` (metric vs step) into
  the sweep dir, logged to the parent run, which ends FINISHED. A sweep with failed jobs exits 1 after that.
"""

from __future__ import annotations

import csv
import gc
import glob
import json
import logging
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ckpteval.errors import CkptEvalError

log = logging.getLogger("ckpteval.sweep")

GLOB_PREFIX = "glob:"
PARENT_KEY = "tracking.parent_run_id"
STATUS_FILE = "job_status.json"
# Result keys that describe the job rather than measure the checkpoint: kept in the CSV, not ranked.
NOT_METRICS = {"step", "tokens_seen"}
BOOKKEEPING = re.compile(r"(tokens|_stderr|stderr|seconds|time_s|samples|n_samples)$|(^|/)n$", re.IGNORECASE)
LOWER_IS_BETTER = re.compile(r"loss|perplexity|ppl|nll|bpb|bits|error|wer|cer", re.IGNORECASE)


# ------------------------------------------------------------------------------------------ expansion


def quote_value(value: str) -> str:
    """`value` as a single-quoted Hydra override value that parses (and resolves) back to exactly `value`.

    Inside quotes commas, spaces, brackets, `=`, `#` and non-ASCII need nothing; a quote (and the backslashes
    before it) and a trailing backslash are escaped for Hydra's lexer, and `${` for OmegaConf, which would
    otherwise read it as an interpolation."""
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    body = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", body)
    trailing = len(body) - len(body.rstrip("\\"))
    return "'" + body + "\\" * trailing + "'"


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def step_order_key(path: str) -> tuple:
    """Checkpoints with a step first, by step; then by name with numbers compared as numbers."""
    from ckpteval.checkpoint import parse_step

    step = parse_step(path)
    return (step is None, step if step is not None else 0, _natural_key(path))


def every_nth(items: list, n: int) -> list:
    """Items 0, n, 2n, ... and always the last one (the newest checkpoint is the one people ask about)."""
    if n <= 1 or not items:
        return list(items)
    picked = items[::n]
    return picked if picked[-1] is items[-1] else picked + [items[-1]]


def _absolute_pattern(pattern: str, cwd: Path) -> str:
    """Anchor a relative pattern at cwd; cwd and the home dir are literal text, not glob syntax."""
    if pattern.startswith("~"):
        head, sep, tail = pattern.partition("/")
        return glob.escape(os.path.expanduser(head)) + sep + tail
    if os.path.isabs(pattern):
        return pattern
    return os.path.join(glob.escape(str(cwd)), pattern)


def expand_pattern(pattern: str, *, cwd: str | Path | None = None, every: int = 1,
                   skip_incomplete: bool = True) -> list[str]:
    """Absolute paths of the complete checkpoints matching `pattern`, in step order (every Nth if every > 1).

    Incomplete matches (a save still running, a crashed copy; per ``checkpoint.check_complete``) are skipped
    with a warning; no match at all, or no complete one, is an error naming the pattern and the dir searched."""
    cwd = Path(cwd or os.getcwd())
    if not pattern:
        raise CkptEvalError("ckpt=glob: has no pattern: write ckpt='glob:DIR/step_*'")
    from ckpteval.checkpoint.listing import entry_complete, list_checkpoints

    remote = "://" in pattern  # glob:s3://bucket/run/step_*: the store's listing (fsspec)
    entries = {e.path: e for e in list_checkpoints(pattern if remote else _absolute_pattern(pattern, cwd))}
    matches = sorted(entries, key=step_order_key)
    if not matches:
        raise CkptEvalError(f"glob:{pattern} matches nothing (relative paths are searched from {cwd}): check the "
                            f"pattern, and quote it (ckpt='glob:{pattern}') so the shell passes it unexpanded")
    if not skip_incomplete:
        return every_nth(matches, every)
    complete, reasons = [], []
    for path in matches:
        ok, reason = entry_complete(entries[path])
        if ok:
            complete.append(path)
        else:
            reasons.append(reason)
            log.warning("skipping incomplete checkpoint %s: %s", path, reason)
    if not complete:
        raise CkptEvalError(f"glob:{pattern} matches {len(matches)} path(s) under {cwd} but no complete checkpoint "
                            f"(first: {reasons[0]}); point the pattern at checkpoint dirs (HF, DCP step_N) or "
                            f".gguf files")
    return every_nth(complete, every)


def _element_text(value: Any) -> str | None:
    """The plain string of a parsed override element (quoted or not), None for non-strings."""
    from hydra.core.override_parser.types import QuotedString

    if isinstance(value, QuotedString):
        return value.text
    return value if isinstance(value, str) else None


def job_override_lists(overrides: Iterable, expand: Callable[[str], list[str]],
                       parent_run_id: str | None = None) -> list[list[str]]:
    """For each key, the `key=value` strings its jobs take: glob values expanded by `expand(pattern)`, every
    other value written back as Hydra's BasicSweeper writes it. The jobs are the cartesian product of the lists.

    `parent_run_id` pins `tracking.parent_run_id` for every job (the sweep's MLflow parent run)."""
    from hydra.core.override_parser.types import Override, Transformer

    last: dict[str, Override] = {}
    for override in overrides:  # a command-line value replaces the sweep file's (hydra.sweeper.params) one
        assert isinstance(override, Override)
        last[override.get_key_element()] = override
    per_key: dict[str, list[str]] = {}
    for key, override in last.items():
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise CkptEvalError(f"{override.input_line}: interval sweeps need an optimizing sweeper; list the "
                                    f"values (a,b,c), use range(start,stop,step) or glob:PATTERN")
            elements = list(override.sweep_iterator())  # one pass: shuffle() must not reorder twice
        else:
            elements = [override._value]  # the parsed element (QuotedString kept), as Hydra's sweeper reads it
        values: list[str] = []
        for element in elements:
            text = _element_text(element)
            if text is not None and text.startswith(GLOB_PREFIX):
                values += [quote_value(path) for path in expand(text[len(GLOB_PREFIX):])]
            else:
                values.append(Transformer.str(element) if override.is_sweep_override()
                              else override.get_value_element_as_str())
        per_key[key] = [f"{key}={v}" for v in dict.fromkeys(values)]  # a checkpoint matched twice runs once
    if parent_run_id:
        per_key.pop(PARENT_KEY, None)
        per_key[PARENT_KEY] = [f"{PARENT_KEY}={quote_value(parent_run_id)}"]
    return list(per_key.values())


# ------------------------------------------------------------------------------------------ parent run


# The parent run itself (open, end, the one open between sweeper and callback) lives in ckpteval.tracking.parent.


def parent_run_id() -> str | None:
    from ckpteval.tracking import parent

    return parent.parent_run_id()


def end_parent_run(status: str, error: str | None = None) -> None:
    """End the open parent run early (the sweep itself failed: no match, a bad override, Ctrl-C, SIGTERM)."""
    from ckpteval.tracking import parent

    parent.end_parent(status, error)


# ------------------------------------------------------------------------------------------ records


@dataclass
class JobRecord:
    job: int
    status: str  # COMPLETED | FAILED
    ckpt: str | None
    step: int | None
    mode: str | None
    variant: str  # the job's overrides other than the checkpoint: what distinguishes its curve
    metrics: dict[str, float] = field(default_factory=dict)
    tokens_seen: int | None = None
    error: str | None = None
    run_dir: str | None = None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _set_variants(records: list[JobRecord], overrides: dict[int, list[str]]) -> None:
    """A job's variant = its overrides that differ between jobs, the checkpoint aside (`mode=harness`)."""
    parsed = {job: dict(o.split("=", 1) if "=" in o else (o, "") for o in ovs) for job, ovs in overrides.items()}
    keys = dict.fromkeys(k for d in parsed.values() for k in d if k.lstrip("+~") not in ("ckpt", PARENT_KEY))
    varying = [k for k in keys if len({d.get(k) for d in parsed.values()}) > 1]
    for r in records:
        d = parsed.get(r.job, {})
        r.variant = " ".join(f"{k}={d[k]}" for k in varying if k in d)


def load_records(sweep_dir: Path, since: float = 0.0) -> list[JobRecord]:
    """The job_status.json files this sweep's jobs wrote (older ones in a reused sweep dir are ignored)."""
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
        step = result.get("step") if _is_number(result.get("step")) else (parse_step(ckpt) if ckpt else None)
        records.append(JobRecord(
            job=num, status=data.get("status", "UNKNOWN"), ckpt=ckpt, step=step, mode=data.get("mode"),
            variant="",
            metrics={k: float(v) for k, v in result.items() if k not in NOT_METRICS and _is_number(v)},
            tokens_seen=result.get("tokens_seen"), error=data.get("error"), run_dir=data["run_dir"]))
    _set_variants(records, overrides)
    records.sort(key=lambda r: (r.variant, r.step is None, r.step or 0, _natural_key(r.ckpt or "")))
    return records


# ------------------------------------------------------------------------------------------ summary


def key_metrics(records: list[JobRecord]) -> list[str]:
    """Metrics that measure the checkpoint (not token counts or stderrs), in the order the jobs report them."""
    names = dict.fromkeys(k for r in records for k in r.metrics)
    return [k for k in names if not BOOKKEEPING.search(k)]


def lower_is_better(metric: str) -> bool:
    return bool(LOWER_IS_BETTER.search(metric))


def best_per_metric(records: list[JobRecord], metrics: list[str]) -> dict[str, JobRecord]:
    best: dict[str, JobRecord] = {}
    for metric in metrics:
        done = [r for r in records if r.status == "COMPLETED" and metric in r.metrics]
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
            if r.status == "COMPLETED" and metric in r.metrics and r is not best:
                found = p_value_vs(metric, best.run_dir, r.run_dir)
                if found is not None:
                    out[(r.job, metric)] = found
    return out


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


def _short_names(records: list[JobRecord]) -> dict[int, str]:
    """Checkpoint paths relative to the dir they share (step_100, or run1/step_100 across runs)."""
    paths = [r.ckpt for r in records if r.ckpt]
    try:
        root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    except ValueError:  # relative and absolute mixed
        root = ""
    return {r.job: (os.path.relpath(r.ckpt, root) if root and r.ckpt else (r.ckpt or "-")) for r in records}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def summary_table(records: list[JobRecord], max_metrics: int = 6, pvalues: dict | None = None) -> str:
    """The stdout summary: one row per job (p-value against the best checkpoint on the same samples where the
    jobs saved them), the best checkpoint per metric, the failed jobs and their errors."""
    metrics = key_metrics(records)
    shown = metrics[:max_metrics]
    names = _short_names(records)
    pvalues = significance(records, shown) if pvalues is None else pvalues
    best_of = best_per_metric(records, shown)
    variants = len({r.variant for r in records}) > 1
    header = ["job", "checkpoint", "step"] + (["variant"] if variants else []) + shown + ["status"]
    rows = [[str(r.job), names[r.job], _fmt(r.step)] + ([r.variant or "-"] if variants else [])
            + [_cell(r, m, best_of, pvalues) for m in shown] + [r.status] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    failed = [r for r in records if r.status != "COMPLETED"]
    lines = [f"== sweep summary: {len(records)} job(s), {len(records) - len(failed)} completed, {len(failed)} failed "
             + "=" * 20]
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
    if failed:
        lines.append("failed jobs:")
        lines += [f"  #{r.job} {names[r.job]}: {(r.error or 'unknown error').splitlines()[0]}" for r in failed]
    if len(metrics) > len(shown):
        lines.append(f"({len(metrics) - len(shown)} more metric(s) in summary.csv)")
    return "\n".join(lines)


def write_csv(records: list[JobRecord], path: Path, pvalues: dict | None = None) -> Path:
    """Every metric of every job; for metrics with per-sample data, `METRIC p_vs_best` and `METRIC significant`
    (p < 0.05 against the best job on the same samples; empty for the best job itself)."""
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
            writer.writerow([r.job, r.ckpt, r.step, r.tokens_seen, r.mode, r.variant, r.status,
                             *[r.metrics.get(m, "") for m in metrics], *stats, (r.error or "")[:2000], r.run_dir])
    return path


def plot_metrics(records: list[JobRecord], path: Path, title: str, max_metrics: int = 8) -> Path | None:
    """One panel per key metric, value vs checkpoint step, a line per variant, the best point starred."""
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
    variants = list(dict.fromkeys(r.variant for r in records))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7.5, 2.4 * len(metrics) + 0.6), sharex=True, squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        for variant in variants:
            points = sorted((r.step, r.metrics[metric]) for r in records
                            if r.variant == variant and r.step is not None and metric in r.metrics)
            if points:
                ax.plot(*zip(*points), marker="o", label=variant or None)
        for i, r in enumerate(r for r in records if r.status != "COMPLETED" and r.step is not None):
            ax.axvline(r.step, color="grey", linestyle=":", linewidth=1, label="failed" if i == 0 else None)
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


def summary_markdown(records: list[JobRecord], max_metrics: int = 6, pvalues: dict | None = None) -> str:
    """The table as markdown, for the parent run's description in the MLflow UI (p-values as in the table)."""
    metrics = key_metrics(records)[:max_metrics]
    names = _short_names(records)
    pvalues = significance(records, metrics) if pvalues is None else pvalues
    best = best_per_metric(records, metrics)
    lines = ["| job | checkpoint | step | " + " | ".join(metrics) + " | status |",
             "|" + "---|" * (len(metrics) + 4)]
    lines += [f"| {r.job} | {names[r.job]} | {_fmt(r.step)} | "
              + " | ".join(_cell(r, m, best, pvalues) for m in metrics) + f" | {r.status} |" for r in records]
    if pvalues:
        lines.append("\np: paired test against the best checkpoint on the same samples; ns = not significant at 0.05")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ callback


def _in_multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    mode = OmegaConf.select(config, "hydra.mode")
    return mode == RunMode.MULTIRUN or str(mode).endswith("MULTIRUN")


def _error_text(exc: BaseException) -> str:
    from ckpteval.errors import CkptEvalError as _UserError

    return str(exc) if isinstance(exc, _UserError) else f"{type(exc).__name__}: {exc}"


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
    among frozen objects waits for the `gc.unfreeze()` at the sweep's end."""
    gc.collect()
    gc.freeze()


class SweepCallback(Callback):
    """Parent MLflow run, per-job status files, and the end-of-sweep summary (see the module docstring)."""

    def __init__(self, plot: bool = True, max_table_metrics: int = 6) -> None:
        self.plot = plot
        self.max_table_metrics = max_table_metrics
        self._started = 0.0

    # -- start: the parent run exists before the sweeper expands the patterns, so every job can nest under it
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ckpteval.tracking import parent

        self._started = time.time()
        parent.take()
        tracking = config.tracking
        if not tracking.enabled:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        from ckpteval.tracking.naming import scan_run_name

        name = scan_run_name(OmegaConf.select(config, "mode.name"), str(sweep_dir))
        overrides = [str(o) for o in config.hydra.overrides.task]
        try:
            from ckpteval.tracking import replay_outbox

            replay_outbox(tracking)
            run = parent.open_parent(tracking, name, {"sweep_dir": str(sweep_dir),
                                                      "overrides": " ".join(overrides)[:5000]})
        except CkptEvalError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
        log.info("MLflow parent run %s (%s): each job's run nests under it", name, run.run_id)

    # -- per job, in the job's own process (whatever the launcher)
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        export_submitit_torch_env()

    # A status file the summary reads back.
    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not _in_multirun(config):
            return
        if os.environ.get("RANK", "0") == "0":
            self._write_status(config, job_return)
        freeze_survivors()

    @staticmethod
    def _write_status(config: DictConfig, job_return: Any) -> None:
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
            "error": None if completed else _error_text(value),
            "traceback": None if completed or not isinstance(value, BaseException)
            else "".join(traceback.format_exception(type(value), value, value.__traceback__))[-8000:],
        }
        out = Path(str(config.hydra.runtime.output_dir))
        out.mkdir(parents=True, exist_ok=True)
        (out / STATUS_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")

    # -- end: table on stdout, CSV + PNG in the sweep dir and on the parent run, parent FINISHED
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ckpteval.tracking import parent

        gc.unfreeze()
        found = parent.take()
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        records = load_records(sweep_dir, since=self._started)
        failed = [r for r in records if r.status != "COMPLETED"]
        pvalues = significance(records, key_metrics(records))
        print(summary_table(records, self.max_table_metrics, pvalues), flush=True)
        csv_path = write_csv(records, sweep_dir / "summary.csv", pvalues)
        png = plot_metrics(records, sweep_dir / "summary.png", f"{sweep_dir.name}: metric vs checkpoint step") \
            if self.plot else None
        print(f"summary: {csv_path}" + (f", {png}" if png else ""), flush=True)
        if found is not None:
            run, name = found
            try:
                self._finish_parent(run, records, [csv_path] + ([png] if png else []), pvalues)
            except Exception as exc:  # never leave the parent RUNNING
                log.warning("could not log the summary to MLflow run %s: %s", run.run_id, exc, exc_info=True)
                run.end("FAILED", f"summary logging failed: {exc}")
                if isinstance(exc, CkptEvalError):
                    print(f"error: {exc}", file=sys.stderr, flush=True)
                    sys.exit(3)
            else:
                from ckpteval.tracking import print_view

                # the view with the key metrics as columns was saved by _finish_parent
                print_view(run, label=f"parent run {name} ({run.run_id})")
        if failed:
            sys.exit(1)

    def _finish_parent(self, run, records: list[JobRecord], artifacts: list[Path],
                       pvalues: dict | None = None) -> None:
        for path in artifacts:
            run.log_artifact(path, "summary")
        metrics = key_metrics(records)
        done = [r for r in records if r.status == "COMPLETED" and r.step is not None]
        # The parent's own history is the training curve when each (metric, step) occurs once (a plain scan).
        pairs = [(m, r.step) for r in done for m in r.metrics]
        if len(pairs) == len(set(pairs)):
            for r in done:
                run.log_metrics(r.metrics, step=r.step)
        best = best_per_metric(records, metrics)
        for metric, r in best.items():
            # "summary/..." sorts after "eval": the UI's first chart section stays the eval curve
            run.log_metrics({f"summary/best/{metric}": r.metrics[metric]}, step=r.step)
        by_job = {r.job: r for r in records}
        for (job, metric), (p, _) in (pvalues or {}).items():  # p of each checkpoint vs the best, at its step
            run.log_metrics({f"summary/p_vs_best/{metric}": p}, step=by_job[job].step)
        from ckpteval.tracking.naming import publish_view

        publish_view(run, metrics[:self.max_table_metrics])
        failed = [r for r in records if r.status != "COMPLETED"]
        run.set_tags({"sweep.jobs": len(records), "sweep.failed": len(failed),
                      **{f"best_ckpt/{m}": r.ckpt for m, r in best.items()},
                      "mlflow.note.content": summary_markdown(records, self.max_table_metrics, pvalues)})
        run.end("FINISHED")

"""Which numbers of a job's result measure the checkpoint, and which way is better: the one definition used by
results logging, the scan summary, the MLflow key-metrics view and the watcher's log lines.

A job's result is a flat dict. `step` and `tokens_seen` describe the checkpoint (the x-axis, never a metric);
counts, standard errors and timings are bookkeeping (logged and kept in summary.csv, never ranked, never a
table column); every other number measures the checkpoint. Loss-like names are lower-is-better.

No imports beyond the standard library: every layer may use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

DESCRIBES_CHECKPOINT = ("step", "tokens_seen")
# counts, standard errors, timings (`*_s`, `*seconds`, anything under `time/`): never ranked, never a series
_BOOKKEEPING = re.compile(r"(tokens|_stderr|stderr|seconds|_s|samples|n_samples)$|(^|/)n$|^time/", re.IGNORECASE)
_LOWER_IS_BETTER = re.compile(r"loss|perplexity|ppl|nll|bpb|bits|error|wer|cer", re.IGNORECASE)


def is_number(value: Any) -> bool:
    """An int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def measured(result: Mapping[str, Any]) -> dict[str, float]:
    """The result's numbers except the ones that describe the checkpoint: what is logged as metrics."""
    return {k: v for k, v in result.items() if k not in DESCRIBES_CHECKPOINT and is_number(v)}


def is_bookkeeping(name: str) -> bool:
    """Token counts, standard errors, sample counts, timings: reported, never ranked."""
    return bool(_BOOKKEEPING.search(name))


def key_metrics(names: Iterable[str]) -> list[str]:
    """The names that measure the checkpoint (bookkeeping left out), in their order, each once."""
    return [n for n in dict.fromkeys(names) if n not in DESCRIBES_CHECKPOINT and not is_bookkeeping(n)]


def table_metrics(result: Mapping[str, Any]) -> list[str]:
    """A job result's metrics worth a table column: its key metrics, `eval/...` first."""
    return sorted(key_metrics(measured(result)), key=lambda k: not k.startswith("eval/"))


def lower_is_better(name: str) -> bool:
    return bool(_LOWER_IS_BETTER.search(name))


def headline(result: Mapping[str, Any], limit: int = 4) -> str:
    """`eval/loss=2.31, ...`: the first few metrics of a result for a log line (loss first, stderrs last)."""
    items = sorted(measured(result).items(), key=lambda kv: (not kv[0].startswith("eval/loss"), "stderr" in kv[0]))
    return ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:limit]) or "-"

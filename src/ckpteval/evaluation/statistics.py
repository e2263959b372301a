"""Is checkpoint A really better than checkpoint B? Paired tests on the SAME samples.

- Accuracy-type benchmark metrics (0/1 per sample): the exact McNemar test. Only discordant samples carry
  information (A right and B wrong: n01, the reverse: n10); under "no difference" n01 ~ Binomial(n01 + n10,
  1/2), and the two-sided p-value is min(1, 2 * P[X <= min(n01, n10)]), computed exactly with integers.
- Held-out loss: the paired t-test on per-window mean NLL (the same windows for both checkpoints), two-sided,
  with the Student t tail from the regularized incomplete beta function.

Pure Python + numpy: no scipy at run time (the tests check both against scipy).
"""

from __future__ import annotations

import json
import math
import re
from math import comb
from pathlib import Path

import numpy as np

from ckpteval.metrics import is_bookkeeping

ALPHA = 0.05  # differences with p >= ALPHA are marked "not significant"


def mcnemar_exact(a, b) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes `a` and `b` (same samples, same order)."""
    a, b = np.asarray(a, dtype=float) > 0.5, np.asarray(b, dtype=float) > 0.5
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in number: {a.shape} vs {b.shape}")
    n01, n10 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return binomial_two_sided(min(n01, n10), n01 + n10)


def binomial_two_sided(k: int, n: int) -> float:
    """2 * P[X <= k] for X ~ Binomial(n, 1/2), capped at 1 (k <= n/2); exact integer arithmetic."""
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_t_test(a, b) -> float:
    """Two-sided p-value of the paired t-test of mean(a - b) == 0."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = d.size
    if n < 2:
        return float("nan")
    sd = float(np.std(d, ddof=1))
    mean = float(np.mean(d))
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    t = mean / (sd / math.sqrt(n))
    df = n - 1
    return min(1.0, regularized_beta(df / (df + t * t), df / 2.0, 0.5))


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by the continued fraction (modified Lentz), using the symmetry for fast convergence."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float, eps: float = 1e-15, tiny: float = 1e-300) -> float:
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def significant(p: float | None, alpha: float = ALPHA) -> bool | None:
    return None if p is None or math.isnan(p) else p < alpha


# ---- the samples a job left in its run dir ---------------------------------------------------------------

WINDOW_FILE = "window_nll.npz"  # written by mode=loss: per set, each window's NLL sum in the global window order
_LOSS = re.compile(r"^eval/(?:(?P<set>[^/]+)/)?loss$")
_HARNESS = re.compile(r"^harness/(?P<task>[^/]+)/(?P<metric>[^/]+)$")


def paired_test_kind(metric: str) -> str | None:
    """Which paired test compares `metric` between two jobs: "paired t" (held-out loss), "McNemar" (harness
    metrics), None (no per-sample data behind it)."""
    if _LOSS.match(metric):
        return "paired t"
    m = _HARNESS.match(metric)
    if m and m["metric"] != "primary" and not is_bookkeeping(m["metric"]):  # n_samples, *_stderr: no samples
        return "McNemar"
    return None


def paired_samples(run_dir: str | Path | None, metric: str) -> dict | None:
    """Per-sample values behind `metric` in a job's run dir, keyed by sample (window index or lm-eval doc_id);
    None when the job left none (another mode, an older run, a metric that is not 0/1 per sample)."""
    if not run_dir:
        return None
    m = _LOSS.match(metric)
    if m:
        path = Path(run_dir) / WINDOW_FILE
        if not path.is_file():
            return None
        with np.load(path) as data:
            name = m["set"] or "data"
            return dict(enumerate(data[name].tolist())) if name in data.files else None
    m = _HARNESS.match(metric)
    return _harness_samples(Path(run_dir), m["task"], m["metric"]) if m else None


def _harness_samples(run_dir: Path, task: str, metric: str) -> dict | None:
    files = sorted(run_dir.glob(f"lm_eval/**/samples_{task}.jsonl"))
    if not files:
        return None
    out = {}
    with open(files[-1], encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            filt = row.get("filter", "none")
            for key, value in row.items():
                name = key if filt == "none" else f"{key}_{filt}"
                if name == metric and isinstance(value, (int, float, bool)) and float(value) in (0.0, 1.0):
                    out[row.get("doc_id")] = float(value)
    return out or None


def p_value_vs(metric: str, best_dir, other_dir) -> tuple[float, int] | None:
    """(p-value, samples) of `metric` of one job against the best job on the samples both saw; None when
    either job has no per-sample data or they did not see the same samples."""
    kind = paired_test_kind(metric)
    if kind is None:
        return None
    best, other = paired_samples(best_dir, metric), paired_samples(other_dir, metric)
    if best is None or other is None or set(best) != set(other):
        return None
    keys = sorted(best, key=str)
    a, b = [best[k] for k in keys], [other[k] for k in keys]
    return (paired_t_test(a, b) if kind == "paired t" else mcnemar_exact(a, b)), len(keys)

"""Is checkpoint A really better than checkpoint B? Paired tests on the SAME samples.

- Accuracy-type benchmark metrics (0/1 per sample): the exact McNemar test. Only discordant samples carry
  information (A right and B wrong: n01, the reverse: n10); under "no difference" n01 ~ Binomial(n01 + n10,
  1/2), and the two-sided p-value is min(1, 2 * P[X <= min(n01, n10)]), computed exactly with integers.
- Held-out loss: the paired t-test on per-window mean NLL (the same windows for both checkpoints), two-sided,
  with the Student t tail from the regularized incomplete beta function.

Pure Python + numpy: no scipy at run time (the tests check both against scipy).
"""

from __future__ import annotations

import math
from math import comb

import numpy as np

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

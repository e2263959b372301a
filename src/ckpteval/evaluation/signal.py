"""Signal or noise: is a difference between checkpoints (or between runs) larger than checkpoint-to-checkpoint noise?

    python run.py -m mode=loss,harness ckpt='glob:runs/*/checkpoints/step_*' harness=offline   # a scan: signal/...
    python run.py mode=compare compare.experiments=[runs-a,runs-b]                              # finished runs

The definitions of AI2's "Signal and Noise" study (Heineman et al. 2025, arXiv 2508.13144; code:
allenai/signal-and-noise, `snr_simple.py`), over one metric of a series of checkpoints:

- last-k mean    = mean of the metric over the run's last k checkpoints (k = `signal.last_k`, capped at the series)
- noise          = sample std (ddof=1) / |mean| over those last k checkpoints   (relative checkpoint-to-checkpoint
                   jitter; undefined for one checkpoint or a zero mean)
- tau            = Kendall's tau-b of the metric against the step over the whole series, negated for
                   lower-is-better metrics, so +1 always means "improved at every checkpoint" (monotonicity)
- signal         = (max - min of the runs' last-k means) / |mean of them|   (relative spread between runs)
- snr            = signal / mean of the runs' noise                          (the spread in units of noise)
- best checkpoint: the one whose trailing mean over w = min(k, checkpoints in its run) checkpoints (itself and the
                   w - 1 before it in its run) is best; only checkpoints with a full window compete, so every
                   smoothed value averages the same number of checkpoints, and a trailing window never changes as
                   later checkpoints arrive.

Pure numpy, no project imports: callers decide each metric's direction and which runs and metrics there are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NAN = float("nan")


def last_k(values: Sequence[float], k: int) -> list[float]:
    """The last min(k, len) values (k >= 1)."""
    if k < 1:
        raise ValueError(f"k must be 1 or more, got {k}")
    return list(values)[-k:]


def relative_noise(values: Sequence[float]) -> float:
    """Sample standard deviation / |mean| (S&N's noise); NaN for fewer than two values or a zero mean."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size < 2:
        return NAN
    mean = float(arr.mean())
    return float(arr.std(ddof=1)) / abs(mean) if mean != 0.0 else NAN


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either variable corrected, as scipy.stats.kendalltau's default); NaN when either
    variable is constant or there are fewer than two points. O(n^2): series are checkpoints, not samples."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"x and y differ in length: {a.shape} vs {b.shape}")
    if a.size < 2:
        return NAN
    i, j = np.triu_indices(a.size, k=1)
    dx, dy = np.sign(a[j] - a[i]), np.sign(b[j] - b[i])
    concordant_minus_discordant = float(np.sum(dx * dy))
    pairs_x, pairs_y = float(np.count_nonzero(dx)), float(np.count_nonzero(dy))  # pairs not tied in x / in y
    if pairs_x == 0 or pairs_y == 0:
        return NAN
    return concordant_minus_discordant / math.sqrt(pairs_x * pairs_y)


def improvement_tau(steps: Sequence[float], values: Sequence[float], lower_is_better: bool) -> float:
    """Kendall's tau of the metric against step, signed so that + means improving."""
    tau = kendall_tau_b(steps, values)
    return 0.0 - tau if lower_is_better else tau  # 0.0 - x: no "-0.0" for a flat series


@dataclass(frozen=True)
class RunStats:
    """One metric over one run's checkpoints."""

    last_k_mean: float
    noise: float
    tau: float
    k: int  # checkpoints averaged (signal.last_k capped at the series length)
    n: int  # checkpoints in the series
    last_step: float | None


def run_stats(steps: Sequence[float], values: Sequence[float], k: int, lower_is_better: bool) -> RunStats:
    """Last-k mean, noise and signed tau of one run's series (points sorted by step here)."""
    if not values:
        raise ValueError("a series needs at least one checkpoint")
    order = sorted(range(len(values)), key=lambda i: steps[i])
    xs, ys = [float(steps[i]) for i in order], [float(values[i]) for i in order]
    tail = last_k(ys, k)
    return RunStats(last_k_mean=float(np.mean(tail)), noise=relative_noise(tail),
                    tau=improvement_tau(xs, ys, lower_is_better), k=len(tail), n=len(ys), last_step=xs[-1])


def relative_spread(means: Sequence[float]) -> float:
    """(max - min) / |mean| of the runs' last-k means (S&N's signal); NaN for fewer than two runs or a zero mean."""
    arr = np.asarray(means, dtype=np.float64)
    if arr.size < 2:
        return NAN
    mean = float(arr.mean())
    return float(arr.max() - arr.min()) / abs(mean) if mean != 0.0 else NAN


def signal_to_noise(means: Sequence[float], noises: Sequence[float]) -> float:
    """signal / mean of the runs' noise; NaN when a noise is undefined, inf when every run is noiseless."""
    signal = relative_spread(means)
    arr = np.asarray(noises, dtype=np.float64)
    if math.isnan(signal) or arr.size == 0 or np.isnan(arr).any():
        return NAN
    noise = float(arr.mean())
    if noise == 0.0:
        return math.inf if signal > 0 else NAN
    return signal / noise


def leader(means: dict[str, float], lower_is_better: bool) -> str | None:
    """The run whose last-k mean is best (ties: the first in order)."""
    finite = {run: m for run, m in means.items() if math.isfinite(m)}
    if not finite:
        return None
    pick = min if lower_is_better else max
    return pick(finite, key=finite.__getitem__)


def trailing_means(values: Sequence[float], k: int) -> list[float]:
    """For each point with w = min(k, len) points up to it, the mean of those w (values in step order); NaN for
    the first w - 1 points, whose window is not full."""
    arr = np.asarray(values, dtype=np.float64)
    w = min(k, arr.size)
    return [float(arr[i - w + 1:i + 1].mean()) if i >= w - 1 else NAN for i in range(arr.size)]


def best_index(smoothed: Sequence[float], lower_is_better: bool) -> int | None:
    """Index of the best smoothed value (ties: the earliest); None when none is finite."""
    finite = [(v, i) for i, v in enumerate(smoothed) if math.isfinite(v)]
    if not finite:
        return None
    key = (lambda vi: (vi[0], vi[1])) if lower_is_better else (lambda vi: (-vi[0], vi[1]))
    return min(finite, key=key)[1]

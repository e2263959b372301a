"""Paired significance tests against independent computations (scipy, and brute-force enumeration)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from ckpteval.evaluation.statistics import binomial_two_sided, mcnemar_exact, paired_t_test, regularized_beta


@pytest.mark.parametrize("seed, n, flip", [(0, 50, 0.1), (1, 200, 0.3), (2, 1000, 0.05), (3, 17, 0.5)])
def test_mcnemar_equals_scipy_binomtest_on_discordant_pairs(seed, n, flip):
    rng = np.random.default_rng(seed)
    a = rng.random(n) < 0.6
    b = np.where(rng.random(n) < flip, ~a, a)
    n01, n10 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    expected = stats.binomtest(n01, n01 + n10, 0.5).pvalue if n01 + n10 else 1.0
    assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_equals_brute_force_enumeration():
    """P-value = probability, under fair coin flips of the discordant pairs, of an outcome at least as extreme."""
    for n01, n10 in [(0, 0), (1, 0), (3, 9), (7, 7), (0, 12), (5, 2)]:
        n = n01 + n10
        observed = abs(n01 - n10)
        extreme = sum(1 for flips in itertools.product((0, 1), repeat=n) if abs(2 * sum(flips) - n) >= observed)
        a = np.array([1] * n01 + [0] * n10 + [1, 0])  # two concordant samples that must not matter
        b = np.array([0] * n01 + [1] * n10 + [1, 0])
        assert mcnemar_exact(a, b) == pytest.approx(extreme / 2**n if n else 1.0, rel=1e-12)


@pytest.mark.parametrize("seed, n, shift", [(0, 30, 0.0), (1, 12, 0.3), (2, 400, 0.05), (3, 3, 1.0)])
def test_paired_t_equals_scipy_ttest_rel(seed, n, shift):
    rng = np.random.default_rng(seed)
    a = rng.normal(3.0, 0.5, n)
    b = a + rng.normal(shift, 0.2, n)
    assert paired_t_test(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)


def test_incomplete_beta_equals_scipy():
    from scipy.special import betainc

    for x, a, b in [(0.1, 0.5, 0.5), (0.9, 10, 0.5), (0.5, 2, 3), (0.999, 200, 0.5), (1e-4, 0.5, 0.5)]:
        assert regularized_beta(x, a, b) == pytest.approx(float(betainc(a, b, x)), rel=1e-10)


def test_binomial_two_sided_is_capped_at_one():
    assert binomial_two_sided(5, 10) == 1.0 and binomial_two_sided(0, 0) == 1.0

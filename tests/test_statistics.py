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


# ---- a scan's summary: p-values against the best checkpoint, on the same samples ----------------------------

SEQ = 32


def _window_nll_reference(ckpt, shards, seq: int) -> np.ndarray:
    """Per-window NLL sums from a plain transformers forward (eval.steps=-1: every window once, in order)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for arr in shards:
            for k in range((len(arr) - 1) // seq):
                w = torch.from_numpy(arr[k * seq: k * seq + seq + 1].astype(np.int64))[None]
                out.append(float(model(input_ids=w, labels=w).loss) * seq)
    return np.array(out)


def _lm_eval_correct(run_dir, task: str, metric: str) -> dict:
    """doc_id -> 0/1 from lm-eval's own per-sample log of one job."""
    import json
    from pathlib import Path

    [path] = Path(run_dir).glob(f"lm_eval/**/samples_{task}.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["doc_id"]: r[metric] for r in rows if r.get("filter", "none") == "none"}


@pytest.mark.slow
def test_scan_summary_p_values_equal_independent_tests(tmp_path, tiny_tokenizer_dir, tiny_token_shards):
    import csv

    from tests import factories

    ckpts = tmp_path / "ckpts"
    for seed, step in enumerate([100, 200, 300]):
        factories.make_hf_checkpoint(ckpts / f"step_{step}", tiny_tokenizer_dir, seed=seed)
    proc = factories.run_cli(["-m", "mode=loss,harness", "ckpt=glob:ckpts/step_*", "data=local",
                              f"data.dataset_path={tiny_token_shards}", f"eval.seq_len={SEQ}", "eval.steps=-1",
                              "harness=offline", "harness.include_path=${ckpteval_tasks:}",
                              "harness.tasks=[ckpteval_mc]", "harness.backend=hf",
                              f"tracking.uri=sqlite:///{tmp_path / 'ml.db'}", "hydra.sweep.dir=sweep"],
                             cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "summary.csv")))
    shards = [np.fromfile(f, dtype=np.uint16) for f in sorted(tiny_token_shards.glob("*.bin"))]
    loss_rows = [r for r in rows if r["mode"] == "loss"]
    nll = {r["step"]: _window_nll_reference(r["checkpoint"], shards, SEQ) for r in loss_rows}
    best = min(loss_rows, key=lambda r: float(r["eval/loss"]))
    for r in loss_rows:
        if r is best:
            assert r["eval/loss p_vs_best"] == ""
            continue
        expected = stats.ttest_rel(nll[best["step"]], nll[r["step"]]).pvalue
        assert float(r["eval/loss p_vs_best"]) == pytest.approx(expected, rel=1e-6)
        assert r["eval/loss significant"] == str(expected < 0.05)

    metric = "harness/ckpteval_mc/acc"
    h_rows = [r for r in rows if r["mode"] == "harness"]
    best = max(h_rows, key=lambda r: float(r[metric]))
    ref = _lm_eval_correct(best["run_dir"], "ckpteval_mc", "acc")
    tested = 0
    for r in h_rows:
        if r is best:
            continue
        other = _lm_eval_correct(r["run_dir"], "ckpteval_mc", "acc")
        n01 = sum(1 for d in ref if ref[d] == 1 and other[d] == 0)
        n10 = sum(1 for d in ref if ref[d] == 0 and other[d] == 1)
        expected = stats.binomtest(n01, n01 + n10, 0.5).pvalue if n01 + n10 else 1.0
        assert float(r[f"{metric} p_vs_best"]) == pytest.approx(expected, rel=1e-9)
        tested += 1
    assert tested == 2
    assert "p=" in proc.stdout and "paired test against the best checkpoint" in proc.stdout

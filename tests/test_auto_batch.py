"""`eval.batch_size=auto`, `harness.batch_size=auto` and `eval.compile=true` on the CPU.

Auto under a small memory budget picks a size that fits it, gives the numbers of that size set by hand (and of
the plain transformers reference, and of lm-eval's HFLM), goes on after a simulated out-of-memory error with a
smaller size and the same numbers; bad settings are one error line; the compiled decoder gives the eager loss.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ckpteval import app
from ckpteval.errors import CkptEvalError
from ckpteval.evaluation import auto_batch
from tests import factories

SEQ = 32
DEVICE = os.environ.get("CKPTEVAL_TEST_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def fresh_probes():
    auto_batch.clear_cache()
    yield
    auto_batch.clear_cache()


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _loss(tmp, ckpt, shards, *extra):
    cfg = factories.compose(["mode=loss", f"ckpt={ckpt}", f"eval.seq_len={SEQ}", "data=local",
                             f"data.dataset_path={shards}", "eval.steps=-1", "tracking.enabled=false",
                             f"eval.device={DEVICE}", *extra])
    return app.main(cfg)


def _reference(ckpt, shards) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    arrays = [np.fromfile(f, dtype=np.uint16) for f in sorted(shards.glob("*.bin"))]
    return factories.reference_loss(model, arrays, SEQ)


# ------------------------------------------------------------------------------------------ loss path


def test_loss_auto_fits_budget_and_equals_fixed(in_tmp, tiny_hf_ckpt, tiny_token_shards):
    """A 2 MB budget holds a few 32-token windows of the tiny model; the loss is that batch size's and the
    plain transformers loop's; a large budget takes every window in one batch and gives the same loss."""
    small = _loss(in_tmp, tiny_hf_ckpt, tiny_token_shards, "eval.batch_size=auto", "eval.memory_budget_gb=0.002")
    chosen = small["eval/batch_size"]
    n_windows = small["eval/tokens"] // SEQ
    assert 1 <= chosen < n_windows
    if DEVICE == "cpu":  # the CPU fit never counts less than the analytic bytes (CUDA: the allocator's exact peak)
        per_window = auto_batch.activation_bytes_per_token(factories.make_model().config, 4) * SEQ
        assert chosen <= 0.002 * 2**30 // per_window
    fixed = _loss(in_tmp, tiny_hf_ckpt, tiny_token_shards, f"eval.batch_size={chosen}")
    assert "eval/batch_size" not in fixed
    assert abs(small["eval/loss"] - fixed["eval/loss"]) <= 1e-6
    assert small["eval/tokens"] == fixed["eval/tokens"] and small["eval/bpb"] == pytest.approx(fixed["eval/bpb"])
    assert abs(small["eval/loss"] - _reference(tiny_hf_ckpt, tiny_token_shards)) <= 1e-5
    large = _loss(in_tmp, tiny_hf_ckpt, tiny_token_shards, "eval.batch_size=auto", "eval.memory_budget_gb=4")
    assert large["eval/batch_size"] == n_windows  # capped at the windows there are: no padding rows
    assert abs(large["eval/loss"] - small["eval/loss"]) <= 1e-6
    saved = json.loads((in_tmp / "results.json").read_text())
    assert saved["eval/batch_size"] == n_windows


def test_loss_out_of_memory_goes_on_smaller(in_tmp, tiny_hf_ckpt, tiny_token_shards, monkeypatch, caplog, capsys):
    """A forward of more than 3 rows "runs out of memory": auto splits each batch and goes on, same loss as a
    fixed batch; a fixed batch size that runs out is one error line."""
    import ckpteval.evaluation.loss as loss_mod

    real = loss_mod.chunked_nll
    sizes = []

    def tight(hidden, head, targets, chunk):
        sizes.append(targets.shape[0])
        if targets.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(hidden, head, targets, chunk)

    fixed = _loss(in_tmp, tiny_hf_ckpt, tiny_token_shards, "eval.batch_size=8")
    monkeypatch.setattr(loss_mod, "chunked_nll", tight)
    auto = _loss(in_tmp, tiny_hf_ckpt, tiny_token_shards, "eval.batch_size=auto", "eval.memory_budget_gb=0.02")
    assert auto["eval/batch_size"] > 3  # the probe (1 and 2 rows) fit; the chosen size did not
    assert max(sizes[-3:]) <= 3 and any(s > 3 for s in sizes)
    assert "out of memory" in caplog.text and "going on with" in caplog.text
    assert abs(auto["eval/loss"] - fixed["eval/loss"]) <= 1e-6
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        _loss(in_tmp, tiny_hf_ckpt, tiny_token_shards, "eval.batch_size=8")
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1] == ("error: out of memory on cpu at eval.batch_size=8 x 32 tokens: use a "
                                               "smaller eval.batch_size, or eval.batch_size=auto")
    monkeypatch.setattr(loss_mod, "chunked_nll", real)
    again = _loss(in_tmp, tiny_hf_ckpt, tiny_token_shards, f"eval.batch_size={auto['eval/batch_size']}")
    assert abs(auto["eval/loss"] - again["eval/loss"]) <= 1e-6


def test_probe_is_kept_per_architecture(tiny_hf_ckpt, tiny_token_shards, monkeypatch):
    """A second checkpoint of the same architecture (a scan) reuses the probe: no forward before the run."""
    calls = []
    real = auto_batch.probe
    monkeypatch.setattr(auto_batch, "probe", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = factories.compose(["mode=loss", "eval.batch_size=auto", f"eval.seq_len={SEQ}", "eval.steps=-1",
                             "eval.memory_budget_gb=0.01"])
    first = auto_batch.loss_batch(cfg, factories.make_model(seed=1), _scorer(1), 40, 1, torch.device("cpu"),
                                  torch.float32)
    second = auto_batch.loss_batch(cfg, factories.make_model(seed=2), _scorer(2), 40, 1, torch.device("cpu"),
                                   torch.float32)
    assert len(calls) == 1 and first.windows == second.windows


def _scorer(seed):
    from ckpteval.evaluation.loss import causal_lm_scorer

    return causal_lm_scorer(factories.make_model(seed=seed))


@pytest.mark.parametrize("overrides, message", [
    (["eval.batch_size=abc"], "eval.batch_size=abc is not a batch size: use a positive integer (eval.batch_size=8) "
                              "or eval.batch_size=auto"),
    (["eval.batch_size=0"], "eval.batch_size=0 is out of range: use 1 or more, or auto"),
    (["harness.batch_size=auto:4"], "harness.batch_size=auto:4 is not a batch size"),
    (["eval.memory_budget_gb=-1"], "eval.memory_budget_gb=-1 is out of range: use a positive number of GB"),
    (["eval.batch_size=auto", "parallel=fsdp"], "eval.batch_size=auto probes one whole model per process: with "
                                                "parallel=fsdp every rank must run the same batch"),
    (["eval.compile=true", "parallel=tp"], "eval.compile=true compiles a whole model per process"),
    (["eval.compile=true", "mode=train_eval"], "train_eval evaluates the model it trains"),
])
def test_bad_settings_are_one_line(overrides, message):
    from ckpteval.job import validate_config

    cfg = factories.compose(["mode=loss", *overrides])
    with pytest.raises(CkptEvalError) as err:
        validate_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_loss_probe_counts_the_logits_chunk_apart(monkeypatch):
    """Windows shorter than a chunk of the vocabulary projection: the logits grow from 1 to 2 probed rows, then
    stop (one chunk at a time). Under a simulated memory (A bytes per token + 12 x vocab bytes per logit of one
    chunk) auto takes exactly the rows that fit it, not the fewer that a line through the two probes gives."""
    from ckpteval.evaluation import loss as loss_mod
    from ckpteval.evaluation.loss import causal_lm_scorer

    model = factories.make_model()
    config = model.config
    seen = []
    real = loss_mod.chunked_nll

    def recording(hidden, head, targets, chunk):
        seen.append((targets.numel(), chunk))
        return real(hidden, head, targets, chunk)

    per_token = 2 * (auto_batch.activation_bytes_per_token(config, 4) + 16)  # above the CPU's analytic floor
    logit = auto_batch.logits_bytes(config, 1)

    def simulated(fn, device):
        seen.clear()
        fn()
        tokens, chunk = seen[-1]
        return per_token * tokens + logit * min(chunk, tokens)

    monkeypatch.setattr(loss_mod, "chunked_nll", recording)
    monkeypatch.setattr(auto_batch, "measure_peak", simulated)
    chunk, expected = 4 * SEQ, 100
    budget = expected * per_token * SEQ + logit * chunk + per_token * SEQ // 2  # 100.5 rows
    cfg = factories.compose(["mode=loss", "eval.batch_size=auto", f"eval.seq_len={SEQ}", "eval.steps=-1",
                             f"eval.logits_chunk={chunk}", f"eval.memory_budget_gb={budget / 2**30}"])
    got = auto_batch.loss_batch(cfg, model, causal_lm_scorer(model, chunk), 10**6, 1, torch.device("cpu"),
                                torch.float32)
    assert got.windows == expected
    fit = next(iter(auto_batch._FITS.values()))
    assert fit.need(expected) <= budget < fit.need(expected + 1)


def test_budget_defaults_and_oom_detection():
    budget, what = auto_batch.memory_budget(torch.device("cpu"), None)
    assert 0 < budget <= auto_batch.available_ram() and "available RAM" in what
    assert auto_batch.memory_budget(torch.device("cpu"), 0.5)[0] == 2**29
    assert auto_batch.is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert auto_batch.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1"))
    assert not auto_batch.is_oom(RuntimeError("shape mismatch"))


# ------------------------------------------------------------------------------------------ FastLM


@pytest.fixture(scope="module")
def lm_setup(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from tests.test_fast_lm import _requests

    model = factories.make_model().to(DEVICE)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return model, tok, _requests(model, tok)


def _instances(reqs, kind="loglikelihood"):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, r, i) for i, r in enumerate(reqs)]


def _gen_requests():
    return _instances([(t, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}) for t in factories.TEXT[:6]],
                      "generate_until")


def test_fastlm_auto_matches_hflm_and_fixed(lm_setup):
    """harness.batch_size=auto under a small budget: HFLM's loglikelihoods, rolling totals and greedy texts; the
    rows per forward follow the budget (more rows for shorter batches, fewer slots than requests)."""
    from lm_eval.models.huggingface import HFLM

    from ckpteval.evaluation.fast_lm import FastLM

    model, tok, reqs = lm_setup
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    auto = FastLM(model, tok, batch_size="auto", memory_budget_gb=0.02)
    rows = []
    score = auto._score_batch
    auto._score_batch = lambda items, shared=(): rows.append(len(items)) or score(items, shared)
    for (r_ll, r_greedy), (ll, greedy) in zip(ref.loglikelihood(_instances(reqs)),
                                              auto.loglikelihood(_instances(reqs)), strict=True):
        assert abs(ll - r_ll) <= 1e-4 and greedy == r_greedy
    plan = auto.rows_plan
    assert plan.auto and plan.chosen()["batch_tokens"] >= 256
    assert plan.rows(256) < plan.rows(32) and max(rows) > 1
    texts = [factories.TEXT[0], " ".join(factories.TEXT[:30])]
    rolling = _instances([(t,) for t in texts], "loglikelihood_rolling")
    for r, o in zip(ref.loglikelihood_rolling(rolling), auto.loglikelihood_rolling(rolling), strict=True):
        assert o == pytest.approx(r, rel=1e-6, abs=1e-4)
    assert auto.generate_until(_gen_requests()) == ref.generate_until(_gen_requests())
    fixed = FastLM(model, tok, batch_size=3).loglikelihood(_instances(reqs))
    assert [g for _, g in fixed] == [g for _, g in auto.loglikelihood(_instances(reqs))]


def test_fastlm_probe_runs_at_the_length_asked_for(lm_setup, monkeypatch):
    """The probe's forwards run at the first batch's length rounded up to a power of two (at least
    MIN_PROBE_TOKENS), not at the model's max_length: on a CPU a full-length probe costs more than a short task."""
    from ckpteval.evaluation.fast_lm import FastLM

    model, tok, reqs = lm_setup
    monkeypatch.setattr(auto_batch, "MIN_PROBE_TOKENS", 32)  # the tiny model's max_length is 256
    lengths = []
    auto = FastLM(model, tok, batch_size="auto", memory_budget_gb=0.02)
    real = auto.probe_forward
    monkeypatch.setattr(auto, "probe_forward", lambda rows, length: lengths.append(length) or real(rows, length))
    short = [(c, x) for c, x in reqs if len(tok(c + x).input_ids) <= 60]
    assert short
    auto.loglikelihood(_instances(short))
    longest = max(len(tok(c + x).input_ids) for c, x in short)
    probed = set(lengths)
    assert len(probed) == 1, probed
    length = probed.pop()
    assert 32 <= length < auto.max_length and length & (length - 1) == 0 and length < 2 * max(32, longest)
    plan = auto.rows_plan
    assert plan.probe_length(33) == 64 and plan.probe_length(10 ** 6) == auto.max_length
    assert plan.chosen()["batch_tokens"] == plan.rows(length) * length


def test_fastlm_out_of_memory_goes_on(lm_setup, monkeypatch):
    """Forwards of more than 2 rows and decoding with more than 2 slots "run out of memory": auto splits and
    goes on with the same loglikelihoods and texts; a fixed size is one error line."""
    import ckpteval.evaluation.generate as gen
    from ckpteval.evaluation.fast_lm import FastLM

    model, tok, reqs = lm_setup
    want = FastLM(model, tok, batch_size=8).loglikelihood(_instances(reqs))
    want_text = FastLM(model, tok, batch_size=8).generate_until(_gen_requests())
    real_score, real_slots = FastLM._score_batch, gen._SlotCache.__init__

    def score(self, batch, shared=()):
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_score(self, batch, shared)

    def slots(self, like, rows, cap):
        if rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        real_slots(self, like, rows, cap)

    monkeypatch.setattr(FastLM, "_score_batch", score)
    monkeypatch.setattr(gen._SlotCache, "__init__", slots)
    auto = FastLM(model, tok, batch_size="auto", memory_budget_gb=1)
    got = auto.loglikelihood(_instances(reqs))
    for (w, wg), (g, gg) in zip(want, got, strict=True):
        assert abs(w - g) <= 1e-5 and wg == gg
    assert auto.generate_until(_gen_requests()) == want_text
    assert auto.rows_plan.scale < 1
    with pytest.raises(CkptEvalError, match="out of memory on cpu at harness.batch_size=8: use a smaller "
                                            "harness.batch_size, or harness.batch_size=auto"):
        FastLM(model, tok, batch_size=8).loglikelihood(_instances(reqs))


def test_harness_job_auto_gives_the_fixed_metrics(in_tmp, tiny_hf_ckpt):
    """`mode=harness harness.batch_size=auto` (FastLM) on the offline tasks: the metrics of a fixed batch size,
    the tokens per forward in the results."""
    from ckpteval.tasks import TASKS_DIR as tasks

    common = ["mode=harness", f"ckpt={tiny_hf_ckpt}", "harness=offline", f"harness.include_path={tasks}",
              "harness.limit=8", "tracking.enabled=false", f"eval.device={DEVICE}", "harness.log_samples=false"]
    fixed = app.main(factories.compose([*common, "harness.batch_size=4"]))
    auto = app.main(factories.compose([*common, "harness.batch_size=auto", "harness.memory_budget_gb=0.05"]))
    assert auto["harness/batch_tokens"] >= 64 and "harness/batch_tokens" not in fixed
    keys = [k for k in fixed if k.startswith("harness/ckpteval_") and not k.endswith("_stderr")]
    assert keys and all(auto[k] == pytest.approx(fixed[k], rel=1e-6) for k in keys)


# ------------------------------------------------------------------------------------------ attention path


def test_attention_takes_the_masked_path_only_where_needed(monkeypatch):
    """The loss path without document masks calls SDPA with no mask and is_causal (its flash / efficient kernels:
    it runs under a flash-only kernel choice); with document masks it passes one. On CUDA flash takes no arbitrary
    mask, so there the flash-only run proves the kernel. (FastLM's rows: tests/test_fast_lm.py, `_spy_masks`.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ckpteval.evaluation.loss import causal_lm_scorer

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = factories.make_model().to(DEVICE, torch.bfloat16)
    tokens = torch.randint(2, 512, (3, SEQ + 1), device=DEVICE)
    tokens[:, 10] = 1  # a document ends inside each window
    with torch.inference_mode(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        plain, _ = causal_lm_scorer(model)(tokens[:, :-1], tokens[:, 1:])
    assert calls and set(calls) == {(True, True)}
    calls.clear()
    with torch.inference_mode():
        causal_lm_scorer(model, doc_sep=1)(tokens[:, :-1], tokens[:, 1:])
    assert calls and set(calls) == {(False, False)}
    assert torch.isfinite(plain).all()


# ------------------------------------------------------------------------------------------ compile


@pytest.mark.slow  # inductor compiles the tiny decoder: ~20-40 s on 2 cores
def test_compiled_decoder_gives_the_eager_loss(in_tmp, tiny_hf_ckpt, tiny_token_shards):
    eager = _loss(in_tmp, tiny_hf_ckpt, tiny_token_shards, "eval.batch_size=8")
    compiled = _loss(in_tmp, tiny_hf_ckpt, tiny_token_shards, "eval.batch_size=8", "eval.compile=true")
    assert abs(compiled["eval/loss"] - eager["eval/loss"]) <= 1e-5
    assert compiled["eval/tokens"] == eager["eval/tokens"]
    assert abs(compiled["eval/loss"] - _reference(tiny_hf_ckpt, tiny_token_shards)) <= 1e-5

"""FastLM (harness.backend=fast) against lm-eval's own HFLM on the same in-memory model and tokenizer.

Per request: loglikelihoods within 1e-4 (float32) and identical is_greedy on shared contexts with 4 choices,
empty contexts, trailing spaces, duplicates and contexts longer than max_length; rolling loglikelihoods and
generation; task metrics from `lm_eval.simple_evaluate` on a small offline multiple-choice task and a
perplexity task written here; few-shot tasks whose documents share a preamble (ckpteval/tasks: ckpteval_fewshot,
ckpteval_gen) run with the shared prefix computed once; greedy generation with stop strings hit and not hit and
max_gen_toks cuts; the prefix cache cap (evictions, same numbers); and under `torchrun --nproc_per_node=2`
(this module run as a script) the same results on both ranks as in one process.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import factories


from lm_eval.api.instance import Instance

from ckpteval.errors import CkptEvalError
from ckpteval.evaluation.fast_lm import FastLM

TEXT = factories.TEXT[:6]
# The parity tests run on CPU by default; CKPTEVAL_TEST_DEVICE=cuda runs them on a GPU (sdpa kernels, autocast).
DEVICE = os.environ.get("CKPTEVAL_TEST_DEVICE", "cpu")


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _hflm(model, tok, batch_size: int = 4, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, **kw)


def _greedy_text(model, tok, context: str, n: int) -> str:
    """The model's own greedy continuation of `context`, as text (so HFLM reports is_greedy=True for it)."""
    ids = torch.tensor([tok.encode(context)], device=model.device)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return tok.decode(ids[0, -n:])


def _requests(model, tok) -> list[tuple[str, str]]:
    reqs = []
    for i in range(3):  # multiple choice: one context, four choices (single- and multi-token)
        ctx = f"Question: {TEXT[i]}\nAnswer:"
        reqs += [(ctx, " yes"), (ctx, " no"), (ctx, " the lazy dog jumps"), (ctx, " model weights")]
    for ctx in ("The quick brown", "def add(a, b):"):  # greedy continuations: is_greedy True somewhere
        reqs += [(ctx, _greedy_text(model, tok, ctx, n)) for n in (1, 3)]
    reqs += [("", "The quick brown fox"), ("", "<|endoftext|>Perplexity is"),  # empty context, both branches
             ("A checkpoint is ", "a snapshot"),  # trailing space moves to the continuation
             ("A checkpoint is ", "a snapshot"),  # duplicate request
             (" ".join(factories.TEXT[:40]), " of the model."),  # longer than max_length (256): truncated
             (" ".join(factories.TEXT[:40]), " tokens")]
    return reqs


def _instances(reqs, kind: str = "loglikelihood"):
    return [Instance(kind, {}, r, i) for i, r in enumerate(reqs)]


@pytest.fixture(scope="module")
def setup(tiny_tokenizer_dir):
    model = factories.make_model().to(DEVICE)
    tok = _tokenizer(tiny_tokenizer_dir)
    return model, tok, _requests(model, tok)


def test_loglikelihood_matches_hflm_per_request(setup):
    model, tok, reqs = setup
    assert len(tok.encode(reqs[-1][0])) > 256, "the truncation case must exceed the model's max_length"
    ref = _hflm(model, tok, batch_size=4).loglikelihood(_instances(reqs))
    ours = FastLM(model, tok, batch_size=3).loglikelihood(_instances(reqs))
    assert any(greedy for _, greedy in ref), "no request exercises is_greedy=True"
    for req, (ref_ll, ref_greedy), (ll, greedy) in zip(reqs, ref, ours, strict=True):
        assert abs(ll - ref_ll) <= 1e-4, (req, ll, ref_ll)
        assert greedy == ref_greedy, req


def test_tokenization_matches_hflm(setup):
    model, tok, reqs = setup
    ref, ours = _hflm(model, tok), FastLM(model, tok)
    for ctx, cont in reqs:
        for text in filter(None, (ctx, ctx + cont, cont)):
            assert ours.tok_encode(text) == ref.tok_encode(text)
    assert (ours.max_length, ours.prefix_token_id, ours.eot_token_id) == \
           (ref.max_length, ref.prefix_token_id, ref.eot_token_id)


def test_short_max_length_truncates_like_hflm(setup):
    model, tok, reqs = setup
    ref = _hflm(model, tok, max_length=24).loglikelihood(_instances(reqs))
    ours = FastLM(model, tok, batch_size=8, max_length=24).loglikelihood(_instances(reqs))
    for (ref_ll, ref_greedy), (ll, greedy) in zip(ref, ours, strict=True):
        assert abs(ll - ref_ll) <= 1e-4 and greedy == ref_greedy


def test_rolling_and_generation_match_hflm(setup):
    model, tok, _ = setup
    texts = [TEXT[0], " ".join(factories.TEXT[:30]), "<|endoftext|>" + TEXT[2]]  # 1 and several windows
    rolling = _instances([(t,) for t in texts], "loglikelihood_rolling")
    ref, ours = _hflm(model, tok, max_length=64), FastLM(model, tok, max_length=64)
    for r, o in zip(ref.loglikelihood_rolling(rolling), ours.loglikelihood_rolling(rolling), strict=True):
        assert o == pytest.approx(r, rel=1e-6, abs=1e-4)
    gen = _instances([(t, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}) for t in TEXT[:3]],
                     "generate_until")
    assert ours.generate_until(gen) == ref.generate_until(gen)


def _spy_masks(lm) -> list:
    """Record whether each scoring forward of `lm` got an attention mask (None: the plain causal kernel)."""
    seen, forward = [], lm.forward

    def spy(ids, pos, mask, keep, cache=None, project=True):
        if keep is not None:  # a scoring forward, not a shared prefix's cache fill
            seen.append((mask is not None, ids.shape[0]))
        return forward(ids, pos, mask, keep, cache, project)

    lm.forward = spy
    return seen


@pytest.mark.parametrize("chunk", [0, 5])  # 0: the default chunk; 5: many chunks per batch, split mid-row
def test_rolling_batches_documents_unmasked_and_matches_hflm(setup, monkeypatch, chunk):
    """Documents shorter than one window and of several windows, windows of different documents in one
    batch, no attention mask, vocabulary scored a chunk of rows at a time: HFLM's totals, in float32 and
    close in bf16 autocast."""
    import ckpteval.evaluation.fast_lm as fast_lm

    if chunk:
        monkeypatch.setattr(fast_lm, "auto_chunk", lambda head, width: chunk)
    model, tok, _ = setup
    texts = [TEXT[0], " ".join(factories.TEXT[:30]), TEXT[3][:12], " ".join(factories.TEXT[5:12]),
             "<|endoftext|>" + TEXT[2], " ".join(factories.TEXT[10:50])]
    lengths = [len(tok.encode(t)) for t in texts]
    assert min(lengths) < 32 < 3 * 32 < max(lengths), lengths  # under one window .. several windows
    rolling = _instances([(t,) for t in texts], "loglikelihood_rolling")
    ref = _hflm(model, tok, batch_size=3, max_length=32).loglikelihood_rolling(rolling)
    lm = FastLM(model, tok, batch_size=3, max_length=32)
    seen = _spy_masks(lm)
    ours = lm.loglikelihood_rolling(rolling)
    for r, o in zip(ref, ours, strict=True):
        assert o == pytest.approx(r, rel=1e-6, abs=1e-4)
    assert seen and not any(masked for masked, _ in seen), "rolling windows went through a 4-D mask"
    assert sum(rows for _, rows in seen) > len(texts) and max(rows for _, rows in seen) == 3
    bf16 = FastLM(model, tok, batch_size=3, max_length=32, dtype="bfloat16").loglikelihood_rolling(rolling)
    for r, b in zip(ref, bf16, strict=True):
        assert b == pytest.approx(r, rel=0.05)


def test_mixed_batches_chunked_scoring_match_hflm(setup, monkeypatch):
    """Shared contexts with several choices (masked rows) beside lone continuations and empty contexts (plain
    causal rows), scored in 7-row vocabulary chunks: HFLM's loglikelihoods and is_greedy, both kinds run."""
    import ckpteval.evaluation.fast_lm as fast_lm

    monkeypatch.setattr(fast_lm, "auto_chunk", lambda head, width: 7)
    model, tok, reqs = setup
    reqs = reqs + [(TEXT[4], " " + TEXT[5]), ("", TEXT[3])]  # one lone long continuation, one empty context
    ref = _hflm(model, tok, batch_size=4).loglikelihood(_instances(reqs))
    lm = FastLM(model, tok, batch_size=4)
    seen = _spy_masks(lm)
    ours = lm.loglikelihood(_instances(reqs))
    assert {masked for masked, _ in seen} == {True, False}
    for req, (ref_ll, ref_greedy), (ll, greedy) in zip(reqs, ref, ours, strict=True):
        assert abs(ll - ref_ll) <= 1e-4 and greedy == ref_greedy, req


def test_bfloat16_is_close_to_float32(setup):
    model, tok, reqs = setup
    ref = FastLM(model, tok).loglikelihood(_instances(reqs))
    autocast = FastLM(model, tok, dtype="bfloat16").loglikelihood(_instances(reqs))
    bf16_model = factories.make_model().to(DEVICE, torch.bfloat16)
    native = FastLM(bf16_model, tok, dtype=torch.bfloat16).loglikelihood(_instances(reqs))
    for (r, _), (a, _), (n, _) in zip(ref, autocast, native, strict=True):
        assert a == pytest.approx(r, rel=0.05, abs=0.5)
        assert n == pytest.approx(r, rel=0.05, abs=0.5)


def test_user_errors(setup):
    model, tok, _ = setup
    with pytest.raises(CkptEvalError, match="torch.distributed"):
        FastLM(model, tok, rank=0, world_size=2)
    with pytest.raises(CkptEvalError, match="load the model in"):
        FastLM(factories.make_model().to(torch.bfloat16), tok, dtype="float32")
    with pytest.raises(CkptEvalError, match="batch_size"):
        FastLM(model, tok, batch_size=0)


# ------------------------------------------------------------------------------------------ task level
MC_TASK = """task: fastlm_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
PPL_TASK = """task: fastlm_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_tasks(root: Path) -> Path:
    """A 12-question, 4-choice task and a perplexity task over the same local jsonl: no network needed."""
    root.mkdir(parents=True, exist_ok=True)
    choices = [" the lazy dog", " a snapshot of the weights", " the next token", " held-out data"]
    rows = [{"question": factories.TEXT[i % 6] + f" ({i})", "choices": choices[i % 2:] + choices[:i % 2],
             "label": i % 4} for i in range(12)]
    data = root / "fastlm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "fastlm_mc.yaml").write_text(MC_TASK.format(data=data))
    (root / "fastlm_ppl.yaml").write_text(PPL_TASK.format(data=data))
    return root


@functools.lru_cache
def _task_manager(task_dir: str):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=task_dir, include_defaults=False)  # indexing lm-eval's own tasks takes ~30 s


def evaluate(lm, task_dir: Path) -> dict | None:
    import lm_eval

    out = lm_eval.simple_evaluate(model=lm, tasks=["fastlm_mc", "fastlm_ppl"], num_fewshot=0, log_samples=True,
                                  task_manager=_task_manager(str(task_dir)), bootstrap_iters=0)
    if out is None:
        return None
    return {"results": out["results"],
            "resps": {t: [s["resps"] for s in out["samples"][t]] for t in out["samples"]}}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("fastlm_tasks"))


def _assert_same_metrics(ours: dict, ref: dict) -> None:
    mc, ref_mc = ours["results"]["fastlm_mc"], ref["results"]["fastlm_mc"]
    for key in ("acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"):
        assert mc[key] == ref_mc[key], key
    for key, value in ref["results"]["fastlm_ppl"].items():
        if isinstance(value, float):
            assert ours["results"]["fastlm_ppl"][key] == pytest.approx(value, rel=1e-6), key
    for task in ("fastlm_mc", "fastlm_ppl"):
        for doc, ref_doc in zip(ours["resps"][task], ref["resps"][task], strict=True):
            for resp, ref_resp in zip(doc, ref_doc, strict=True):
                got, want = (resp[0], ref_resp[0])
                if isinstance(want, (list, tuple)):  # loglikelihood: (ll, is_greedy)
                    assert abs(got[0] - want[0]) <= 1e-4 and got[1] == want[1]
                else:  # rolling: summed over the document
                    assert got == pytest.approx(want, rel=1e-6, abs=1e-4)


def test_task_metrics_identical_to_hflm(setup, task_dir):
    model, tok, _ = setup
    ref = evaluate(_hflm(model, tok, batch_size=4), task_dir)
    ours = evaluate(FastLM(model, tok, batch_size=4), task_dir)
    assert len(ref["resps"]["fastlm_mc"]) == 12
    _assert_same_metrics(ours, ref)


# ------------------------------------------------------------------------------------------ shared prefixes
from ckpteval.tasks import TASKS_DIR as REPO_TASKS  # noqa: E402 - the offline tasks (package data)
FEWSHOT_TASKS = ["ckpteval_fewshot", "ckpteval_gen"]  # 3-shot MC and 2-shot generation, first_n preambles


def evaluate_fewshot(lm) -> dict | None:
    import lm_eval

    out = lm_eval.simple_evaluate(model=lm, tasks=FEWSHOT_TASKS, log_samples=True, bootstrap_iters=0,
                                  task_manager=_task_manager(str(REPO_TASKS)))
    if out is None:
        return None
    return {"results": {t: {k: v for k, v in r.items() if isinstance(v, (int, float, str))}
                        for t, r in out["results"].items()},
            "resps": {t: [s["resps"] for s in out["samples"][t]] for t in out["samples"]}}


@pytest.fixture(scope="module")
def fewshot_reference(setup):
    model, tok, _ = setup
    return evaluate_fewshot(_hflm(model, tok, batch_size=4))


def _assert_same_fewshot(ours: dict, ref: dict) -> None:
    for task in FEWSHOT_TASKS:
        assert ours["results"][task] == ref["results"][task], task  # identical metrics
    assert len(ref["resps"]["ckpteval_fewshot"]) == 40
    for doc, ref_doc in zip(ours["resps"]["ckpteval_fewshot"], ref["resps"]["ckpteval_fewshot"], strict=True):
        for (got,), (want,) in zip(doc, ref_doc, strict=True):
            assert abs(got[0] - want[0]) <= 1e-4 and got[1] == want[1]
    assert ours["resps"]["ckpteval_gen"] == ref["resps"]["ckpteval_gen"]  # identical generated text


def test_fewshot_shared_prefix_matches_hflm(setup, fewshot_reference):
    model, tok, _ = setup
    lm = FastLM(model, tok, batch_size=4)
    ours = evaluate_fewshot(lm)
    _assert_same_fewshot(ours, fewshot_reference)
    store = lm.prefix_store
    assert store.hits >= 4 and max(len(p) for p in store.entries) >= 100, "the few-shot preamble was not shared"


def _two_preamble_requests() -> list[tuple[str, str]]:
    """Documents under two different few-shot preambles of similar length, interleaved."""
    pre = {k: " ".join(factories.TEXT[k * 4:k * 4 + 4]) + "\n\n" for k in (0, 1)}
    reqs = []
    for d in range(8):
        ctx = pre[d % 2] + f"Question {d}: {TEXT[d % 6]}\nAnswer:"
        reqs += [(ctx, " yes"), (ctx, " no"), (ctx, " the next token")]
    return reqs


def test_shared_prefix_plan():
    from ckpteval.evaluation.prefix_cache import plan_shared_prefixes

    a, b = tuple(range(100)), tuple(range(500, 600))
    seqs = [a + (1000 + i, 7) for i in range(5)] + [b + (2000 + i,) for i in range(3)] + [(9, 9, 9), a[:50]]
    plan = {tuple(sorted(m)): s for s, m in plan_shared_prefixes(seqs, max_tokens=8192)}
    assert plan == {(0, 1, 2, 3, 4): 100, (5, 6, 7): 100, (8, 9): 0}  # a[:50] gains less with the a-group
    capped = {tuple(sorted(m)): s for s, m in plan_shared_prefixes(seqs, max_tokens=99)}
    assert capped == {(0, 1, 2, 3, 4, 9): 49, (5, 6, 7, 8): 0}  # a shorter prefix that fits; b's does not
    for s, members in plan_shared_prefixes(seqs, max_tokens=8192):
        assert all(len(seqs[m]) > s and seqs[m][:s] == seqs[members[0]][:s] for m in members)


def test_prefix_cache_cap_evicts_and_results_stay_identical(setup):
    model, tok, _ = setup
    reqs = _two_preamble_requests()
    ref = _hflm(model, tok).loglikelihood(_instances(reqs))
    roomy = FastLM(model, tok, batch_size=2)
    results = {"roomy": roomy.loglikelihood(_instances(reqs))}
    sizes = sorted(len(p) for p in roomy.prefix_store.entries)
    assert len(sizes) == 2 and roomy.prefix_store.evictions == 0
    capped = FastLM(model, tok, batch_size=2, prefix_cache_tokens=sizes[-1])  # room for one preamble at a time
    results["capped"] = capped.loglikelihood(_instances(reqs))
    results["again"] = capped.loglikelihood(_instances(reqs))  # the evicted preamble is computed again
    assert capped.prefix_store.evictions >= 2 and capped.prefix_store.tokens <= sizes[-1]
    assert capped.prefix_store.misses >= 3
    off = FastLM(model, tok, batch_size=2, prefix_cache_tokens=0)  # nothing shared beyond identical contexts
    results["off"] = off.loglikelihood(_instances(reqs))
    assert off.prefix_store.misses == 0
    for name, got in results.items():
        for (want_ll, want_greedy), (ll, greedy) in zip(ref, got, strict=True):
            assert abs(ll - want_ll) <= 1e-4 and greedy == want_greedy, name


def _gen(prompts, kwargs) -> list:
    return _instances([(p, dict(kwargs)) for p in prompts], "generate_until")


def test_generate_until_matches_hflm(setup):
    model, tok, _ = setup
    pre = "Answer the questions.\n\n" + "".join(f"Question: {TEXT[i]}\nAnswer: yes\n\n" for i in range(2))
    prompts = [pre + f"Question: {TEXT[i]} ({i})\nAnswer:" for i in range(6)]
    prompts += [TEXT[0], " ".join(factories.TEXT[:40])]  # no preamble; longer than max_length: left-truncated
    ref_lm, lm = _hflm(model, tok, batch_size=3), FastLM(model, tok, batch_size=3)
    free = ref_lm.generate_until(_gen(prompts, {"until": [], "max_gen_toks": 10}))
    assert lm.generate_until(_gen(prompts, {"until": [], "max_gen_toks": 10})) == free
    hit = next(t[3:5] for t in free if len(t) >= 6 and t[3:5].strip())  # a stop string the model produces
    cases = [{"until": [hit, "zzqq"], "max_gen_toks": 10, "do_sample": False},  # hit in some rows, not others
             {"until": "zzqq", "max_gen_toks": 3},  # never hit: cut at max_gen_toks
             {"until": ["\n"], "max_gen_toks": 6, "temperature": 0.0}]
    for kwargs in cases:
        want = ref_lm.generate_until(_gen(prompts, kwargs))
        assert lm.generate_until(_gen(prompts, kwargs)) == want, kwargs
    cut = ref_lm.generate_until(_gen(prompts, cases[0]))
    assert any(c != f for c, f in zip(cut, free)) and any(c == f for c, f in zip(cut, free))
    assert lm.prefix_store.hits >= 1, "the shared preamble was not reused"


def _preamble_prompts() -> list[str]:
    """Documents under two few-shot preambles of different lengths, interleaved, and two with no preamble."""
    pre = {0: "Answer briefly.\n\n" + "".join(f"Q: {TEXT[i]}\nA: yes\n\n" for i in range(3)),
           1: "Continue the text.\n\n" + " ".join(factories.TEXT[6:10]) + "\n\n"}
    return [pre[d % 2] + f"Q{d}: " + TEXT[d % 6][:12 + 5 * d] for d in range(10)] + [TEXT[1], TEXT[4] + " and"]


def _stop_string(texts: list[str]) -> str:
    """A 2-character piece that several (not all) rows produce, at different points."""
    for text in texts:
        for k in range(len(text) - 1):
            piece = text[k:k + 2]
            having = [t.find(piece) for t in texts if piece in t]
            if piece.isprintable() and piece.strip() and 2 <= len(having) < len(texts) and len(set(having)) > 1:
                return piece
    raise AssertionError(f"no usable stop string in {texts}")


def test_generation_decodes_rows_of_different_preambles_together_like_hflm(setup, monkeypatch):
    from ckpteval.evaluation import generate

    model, tok, _ = setup
    prompts = _preamble_prompts()
    ref_lm = _hflm(model, tok, batch_size=4)
    free = ref_lm.generate_until(_gen(prompts, {"until": [], "max_gen_toks": 12}))
    hit = _stop_string(free)
    steps = []  # request indices of the rows in each decode step
    step = generate._SlotCache.step
    monkeypatch.setattr(generate._SlotCache, "step", lambda self, lm, rows: steps.append([r.idx for r in rows])
                        or step(self, lm, rows))
    lm = FastLM(model, tok, batch_size=4)
    cases = [{"until": [], "max_gen_toks": 12},  # every row runs to max_gen_toks
             {"until": [hit, "zzqq"], "max_gen_toks": 12},  # hit at different steps in some rows, not in others
             {"until": ["zzqq"], "max_gen_toks": 1}]  # one token: rows end at their prefill
    for kwargs in cases:
        want = ref_lm.generate_until(_gen(prompts, kwargs))
        assert lm.generate_until(_gen(prompts, kwargs)) == want, kwargs
    cut = ref_lm.generate_until(_gen(prompts, cases[1]))
    assert len({len(c) for c, f in zip(cut, free) if c != f}) > 1, "stop string hit at one point only"
    assert any(c == f for c, f in zip(cut, free)), "every row hit the stop string"
    assert len(lm.prefix_store.entries) == 2, "the two preambles were not shared"
    assert max(len(s) for s in steps) == 4
    assert any({i % 2 for i in s if i < 10} == {0, 1} for s in steps), "no batch held rows of both preambles"
    assert any(set(b) - set(a) for a, b in itertools.pairwise(steps)), "no row joined a running batch"


def test_decode_steps_give_plain_forward_logits(setup, monkeypatch):
    """Every row of every continuously batched decode step (rows of two preambles and none side by side, each at
    its own position) gets the logits of a plain transformers forward over its whole sequence."""
    from ckpteval.evaluation import generate

    model, tok, _ = setup
    lm = FastLM(model, tok, batch_size=4)
    free = lm.generate_until(_gen(_preamble_prompts(), {"until": [], "max_gen_toks": 8}))
    reqs = _gen(_preamble_prompts(), {"until": [_stop_string(free)], "max_gen_toks": 8})  # rows end at different steps
    prompts = generate.prepare_group(lm, reqs, list(range(len(reqs))))[0]
    seen, step = [], generate._SlotCache.step
    forward = lm.forward

    def spy(self, lm_, rows):
        seqs = [prompts[r.idx] + tuple(r.gen) for r in rows]  # the last generated token is the one fed
        monkeypatch.setattr(lm, "forward", lambda *a, **k: seen.append((seqs, forward(*a, **k))) or seen[-1][1])
        try:
            return step(self, lm_, rows)
        finally:
            monkeypatch.setattr(lm, "forward", forward)

    monkeypatch.setattr(generate._SlotCache, "step", spy)
    lm.generate_until(reqs)
    assert len(seen) >= 4 and max(len(seqs) for seqs, _ in seen) == 4
    moved = 0  # rows found in a different slot (position in the step) than in the step before
    for (before, _), (after, _) in itertools.pairwise(seen):
        slot = {seq: j for j, seq in enumerate(before)}
        moved += sum(slot.get(seq[:-1], j) != j for j, seq in enumerate(after))
    assert moved, "no running row moved to a freed slot"
    for seqs, logits in seen:
        for seq, got in zip(seqs, logits, strict=True):
            with torch.no_grad():
                want = model(torch.tensor([seq], device=model.device)).logits[0, -1]
            assert torch.allclose(got, want, atol=1e-4), (len(seq), (got - want).abs().max())


def test_gold_continuations_scored_in_the_generation_prefill(setup):
    """With `gold_target` (bpb on a generative task), each prompt's gold continuation rides in the prompt's own
    prefill: the generations are unchanged, no loglikelihood batch runs, and the scores are HFLM's
    loglikelihood(prompt, gold). Prompts whose loglikelihood context is not the generation prompt (a trailing
    space moves to the continuation; a prompt left-truncated for generation) are left to `loglikelihood`."""
    model, tok, _ = setup
    long = " ".join(factories.TEXT[:40])
    prompts = _preamble_prompts() + ["A checkpoint is ", long]
    answers = [" yes", " the lazy dog jumps", "no", " model weights", "\n"]
    gold_of = {p: answers[k % len(answers)] for k, p in enumerate(prompts)}
    gold_of[prompts[0]] = _greedy_text(model, tok, prompts[0], 2)
    kwargs = {"until": ["zzqq"], "max_gen_toks": 4}
    plain = FastLM(model, tok, batch_size=4).generate_until(_gen(prompts, kwargs))
    lm = FastLM(model, tok, batch_size=4)
    lm.gold_target = lambda req: gold_of[req.args[0]]
    batches = []
    score = lm._score_batch
    lm._score_batch = lambda *a: batches.append(a) or score(*a)
    assert lm.generate_until(_gen(prompts, kwargs)) == plain
    assert not batches
    scored = lm.take_gold_scores()
    assert set(scored) == {(p, gold_of[p]) for p in prompts if p == p.rstrip() and p != long}
    assert ("A checkpoint is ", gold_of["A checkpoint is "]) not in scored and len(scored) >= 8
    want = _hflm(model, tok, batch_size=4).loglikelihood(_instances(list(scored)))
    for (key, (ll, greedy)), (want_ll, want_greedy) in zip(scored.items(), want, strict=True):
        assert abs(ll - want_ll) <= 1e-4 and greedy == want_greedy, key
    assert any(greedy for _, greedy in want) and not all(greedy for _, greedy in want)
    assert lm.take_gold_scores() == {}  # handed over once


def test_settled_cut_never_changes_with_more_text():
    """A row stops once `settled`: lm-eval's own cut (postprocess_generated_text, stop strings split in turn) of
    any longer text must equal the cut of the text so far; overlapping stop strings included."""

    from lm_eval.models.utils import postprocess_generated_text

    from ckpteval.evaluation.generate import settled

    def cut(text, until):
        return postprocess_generated_text(text, until, None)

    until = [" a ", " b ", "ab"]
    assert cut("x b ", until) == "x" and cut("x b a ", until) == "x b"  # " a " starts inside " b ": it wins
    assert not settled("x b ", until) and settled("x b a b", until)  # the earliest hit alone settles nothing
    stopped = 0
    for full in map("".join, itertools.product("ab ", repeat=8)):
        for k in range(len(full) + 1):
            if settled(full[:k], until):
                assert cut(full[:k], until) == cut(full, until), (full, k)
                stopped += k < len(full)
                break
    assert stopped > 1000


def test_generation_stops_at_eos_like_hflm(setup):
    model, tok, _ = setup
    prompts = _preamble_prompts()
    ids = torch.tensor([tok.encode(prompts[0])])
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[0]
    eos_model = factories.make_model()  # the same weights; an ordinary token the model produces is its EOS
    eos_model.generation_config.eos_token_id = int(greedy[ids.shape[1] + 3])
    kwargs = {"until": ["zzqq"], "max_gen_toks": 12}
    want = _hflm(eos_model, tok, batch_size=4).generate_until(_gen(prompts, kwargs))
    free = _hflm(model, tok, batch_size=4).generate_until(_gen(prompts, kwargs))
    assert FastLM(eos_model, tok, batch_size=4).generate_until(_gen(prompts, kwargs)) == want
    assert any(len(w) < len(f) for w, f in zip(want, free)), "no row ended at EOS"
    assert any(w == f for w, f in zip(want, free)), "every row ended at EOS"


def test_sampling_goes_to_hflm(setup, monkeypatch, caplog):
    model, tok, _ = setup
    lm = FastLM(model, tok)
    calls = []
    monkeypatch.setattr(type(lm.hflm), "generate_until",
                        lambda self, reqs, disable_tqdm=False: calls.append(len(reqs)) or ["s"] * len(reqs))
    reqs = _gen(TEXT[:2], {"until": ["\n"], "do_sample": True, "temperature": 0.7})
    reqs += _gen(TEXT[2:3], {"until": ["\n"], "max_gen_toks": 2})
    with caplog.at_level("INFO", logger="ckpteval.evaluation.generate"):
        out = lm.generate_until(reqs)
    assert calls == [2] and out[:2] == ["s", "s"] and out[2] != "s"
    assert "sampling" in caplog.text and "HFLM" in caplog.text


def test_generation_room_error(setup):
    model, tok, _ = setup
    with pytest.raises(CkptEvalError, match="max_gen_toks"):
        FastLM(model, tok, max_length=16).generate_until(_gen(TEXT[:1], {"until": [], "max_gen_toks": 16}))


# ------------------------------------------------------------------------------------------ data parallel
def _dp_generation() -> list:
    """Short prompts and prompts under two preambles (rows of both decode in one batch), stop string hit."""
    return _gen(TEXT[:3] + _preamble_prompts(), {"until": ["\n", "e"], "max_gen_toks": 6})


def _driver(spec_path: str) -> None:
    """Under torchrun: FastLM sharded over 2 ranks; each rank writes what it got back."""
    spec = json.loads(Path(spec_path).read_text())
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = factories.make_model()
    tok = _tokenizer(spec["tok"])
    lm = FastLM(model, tok, batch_size=2, rank=rank, world_size=world)
    reqs = _requests(model, tok)
    rows, score_batch = [], lm._score_batch
    lm._score_batch = lambda batch, *a: rows.append(len(batch)) or score_batch(batch, *a)  # this rank's share
    gen = _dp_generation()
    out = {"ll": lm.loglikelihood(_instances(reqs))}
    out["rows"] = sum(rows)
    out |= {"gen": lm.generate_until(gen), "evaluate": evaluate(lm, Path(spec["tasks"])),
            "fewshot": evaluate_fewshot(lm)}
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.slow
def test_data_parallel_matches_single_process(setup, task_dir, tiny_tokenizer_dir, tmp_path, fewshot_reference):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"tok": str(tiny_tokenizer_dir), "tasks": str(task_dir), "out": str(tmp_path)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(factories.REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "tests.test_fast_lm", str(spec)]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    model, tok, reqs = setup
    single = FastLM(model, tok, batch_size=2)
    groups = len(single._group(single._tokenized(_instances(reqs))))
    assert ranks[0]["rows"] > 0 and ranks[1]["rows"] > 0 and ranks[0]["rows"] + ranks[1]["rows"] == groups
    ll = single.loglikelihood(_instances(reqs))
    gen = _dp_generation()
    for r in ranks:  # every rank holds every result, in request order
        assert len(r["ll"]) == len(reqs)
        for (want, want_greedy), (got, got_greedy) in zip(ll, r["ll"], strict=True):
            assert abs(got - want) <= 1e-5 and got_greedy == want_greedy
        assert r["gen"] == single.generate_until(gen)
    assert ranks[0]["gen"] == _hflm(model, tok, batch_size=2).generate_until(gen)
    # simple_evaluate returns results where LOCAL_RANK == 0 only, identical to one process
    assert ranks[1]["evaluate"] is None
    _assert_same_metrics(ranks[0]["evaluate"], evaluate(single, task_dir))
    # (b) few-shot shared-prefix MC and (c) generation: the same as HFLM in one process, on rank 0
    assert ranks[1]["fewshot"] is None
    _assert_same_fewshot(json.loads(json.dumps(evaluate_fewshot(single))), ranks[0]["fewshot"])
    _assert_same_fewshot(ranks[0]["fewshot"], json.loads(json.dumps(fewshot_reference)))


if __name__ == "__main__":
    _driver(sys.argv[1])

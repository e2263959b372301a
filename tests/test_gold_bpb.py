"""Bits per byte on the gold answer (`harness/{task}/bpb`) and the centered aggregate (`harness/core`).

References are independent of ckpteval and of lm-eval's scoring: a plain transformers forward (float32) of each
document's gold continuation after the prompt lm-eval built (read from its sample logs), the gold continuation
written out here from the task YAML and the data file, and chance levels counted from the data file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ckpteval import app
from ckpteval.tasks import TASKS_DIR
from tests import factories

TASKS = ["ckpteval_mc", "ckpteval_mc_nodelim", "ckpteval_gen"]
LIMIT = 8
# the gold continuation as each task's YAML defines it: (target_delimiter + choice) for multiple choice,
# target_delimiter ("") + doc_to_target (" {{choices[label]}}") for the generative one
GOLD = {"ckpteval_mc": lambda d: " " + d["choices"][d["label"]],
        "ckpteval_mc_nodelim": lambda d: d["choices"][d["label"]],
        "ckpteval_gen": lambda d: " " + d["choices"][d["label"]]}


def _test_docs() -> list[dict]:
    rows = [json.loads(line) for line in (TASKS_DIR / "ckpteval_mc.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == "test"][:LIMIT]


def _run(tmp: Path, ckpt: Path, backend: str, *extra: str) -> tuple[dict, Path]:
    out = tmp / backend
    out.mkdir(parents=True, exist_ok=True)
    cfg = factories.compose(["mode=harness", f"ckpt={ckpt}", "harness=offline", f"harness.include_path={TASKS_DIR}",
                             f"harness.tasks=[{','.join(TASKS)}]", f"harness.limit={LIMIT}", "harness.batch_size=4",
                             f"harness.backend={backend}", "harness.gen_kwargs='max_gen_toks=1'",  # bpb needs no long answers
                             "tracking.enabled=false", *extra])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out)
        return app.main(cfg), out


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("gold")
    ckpt = factories.make_hf_checkpoint(tmp / "run" / "step_10", tiny_tokenizer_dir, seed=3)
    return {"ckpt": ckpt, "tmp": tmp, **{b: _run(tmp, ckpt, b) for b in ("fast", "hf")}}


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.glob(f"lm_eval/**/samples_{task}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _reference_bits(model, tok, context: str, continuation: str) -> float:
    """-sum log2 p(continuation tokens | context) / UTF-8 bytes, from one plain float32 forward."""
    ctx_ids = tok(context)["input_ids"]
    full = tok(context + continuation)["input_ids"]
    assert full[:len(ctx_ids)] == ctx_ids  # the continuation starts on a token boundary
    with torch.no_grad():
        logp = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
    nats = sum(float(logp[len(ctx_ids) - 1 + i, t]) for i, t in enumerate(full[len(ctx_ids):]))
    return -nats / math.log(2) / len(continuation.encode("utf-8"))


@pytest.fixture(scope="module")
def reference(evaluated) -> dict[str, tuple[float, float]]:
    """(mean, stderr) of the reference bits per byte of each task, contexts from the hf run's sample logs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(evaluated["ckpt"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(evaluated["ckpt"])
    docs = _test_docs()
    out = {}
    for task in TASKS:
        bits = []
        for s in sorted(_samples(evaluated["hf"][1], task), key=lambda s: s["doc_id"]):
            doc = docs[s["doc_id"]]
            gold = GOLD[task](doc)
            if task == "ckpteval_gen":
                context = s["arguments"][0][0]
            else:
                context, cont = s["arguments"][doc["label"]]
                assert cont == gold  # lm-eval's continuation is the one written out above
            bits.append(_reference_bits(model, tok, context, gold))
        assert len(bits) == LIMIT
        mean = sum(bits) / len(bits)
        stderr = math.sqrt(sum((b - mean) ** 2 for b in bits) / (len(bits) - 1) / len(bits))
        out[task] = (mean, stderr)
    return out


@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_bpb_on_gold_equals_a_plain_transformers_forward(evaluated, reference, backend):
    result = evaluated[backend][0]
    for task, (mean, stderr) in reference.items():
        assert result[f"harness/{task}/bpb"] == pytest.approx(mean, rel=1e-6), task
        assert result[f"harness/{task}/bpb_stderr"] == pytest.approx(stderr, rel=1e-5), task
    # the delimiter counts: the same choices with and without the leading space differ
    assert result["harness/ckpteval_mc/bpb"] != result["harness/ckpteval_mc_nodelim/bpb"]


def test_generative_bpb_costs_no_loglikelihood_call(evaluated, monkeypatch):
    """Under FastLM a generate_until task's gold continuations are scored in the generation's own prefills: a
    run of the generative task alone makes no loglikelihood call, and its bpb is the full run's (checked
    against a plain forward above)."""
    from ckpteval.evaluation.fast_lm import FastLM

    calls = []
    loglikelihood = FastLM.loglikelihood
    monkeypatch.setattr(FastLM, "loglikelihood", lambda self, reqs, **kw: calls.append(len(reqs))
                        or loglikelihood(self, reqs, **kw))
    result, _ = _run(evaluated["tmp"] / "gen_only", evaluated["ckpt"], "fast", "harness.tasks=[ckpteval_gen]")
    assert calls == []
    want = evaluated["fast"][0]["harness/ckpteval_gen/bpb"]
    assert result["harness/ckpteval_gen/bpb"] == pytest.approx(want, rel=1e-6)


def test_core_is_the_mean_centered_primary_over_tasks_with_a_chance_level(evaluated):
    result = evaluated["fast"][0]
    docs = _test_docs()
    random = sum(1 / len(d["choices"]) for d in docs) / len(docs)  # every task here scores the same documents
    centered = [(result["harness/ckpteval_mc/acc_norm"] - random) / (1 - random),  # primary: acc_norm
                (result["harness/ckpteval_mc_nodelim/acc"] - random) / (1 - random)]  # primary: acc
    # ckpteval_gen (exact_match, no choices, no stated random_baseline) is left out
    assert result["harness/core"] == pytest.approx(sum(centered) / 2, rel=1e-12)
    keys = list(result)
    assert keys.index("harness/core") == keys.index("harness/mean_primary") + 1  # printed beside it
    saved = json.loads((evaluated["fast"][1] / "results.json").read_text())
    assert saved["harness/core"] == result["harness/core"]


def test_core_uses_a_stated_random_baseline_and_lists_the_others(caplog):
    from ckpteval.evaluation.harness import core_score, harness_metrics

    results = {"results": {"a": {"acc,none": 0.7}, "b": {"exact_match,none": 0.4}, "c": {"acc,none": 0.9},
                           "d": {"word_perplexity,none": 12.0}},
               "higher_is_better": {"a": {"acc": True}, "b": {"exact_match": True}, "c": {"acc": True},
                                    "d": {"word_perplexity": False}},
               "configs": {"b": {"metadata": {"random_baseline": 0.1}}},
               "chance": {"a": 0.25}}
    core, used, left_out = core_score(results)
    assert used == ["a", "b"] and left_out == ["c", "d"]
    assert core == pytest.approx(((0.7 - 0.25) / 0.75 + (0.4 - 0.1) / 0.9) / 2)
    with caplog.at_level("INFO"):
        assert harness_metrics(results)[0]["harness/core"] == core
    assert "harness/core: c, d left out" in caplog.text


def test_bpb_switch_off_keeps_core(evaluated):
    result, _ = _run(evaluated["tmp"] / "off", evaluated["ckpt"], "fast", "harness.bpb=false",
                     "harness.tasks=[ckpteval_mc]", "harness.limit=4")
    assert not [k for k in result if k.endswith("/bpb")]
    docs = _test_docs()[:4]
    random = sum(1 / len(d["choices"]) for d in docs) / len(docs)
    assert result["harness/core"] == pytest.approx((result["harness/ckpteval_mc/acc_norm"] - random) / (1 - random))


def test_subprocess_backend_reads_bpb_from_the_cli_sample_logs(evaluated):
    """backend=subprocess gets multiple-choice bpb from the lm_eval CLI's samples_*.jsonl (arguments and responses
    stringified by lm-eval's EvaluationTracker); rebuilt here from the in-memory run's samples."""
    from lm_eval.utils import sanitize_list

    from ckpteval.evaluation.gold import add_gold_scores_from_samples
    from ckpteval.evaluation.harness import resolve_tasks

    result, out = evaluated["hf"]
    cfg = factories.compose(["harness=offline", f"harness.include_path={TASKS_DIR}",
                             f"harness.tasks=[{','.join(TASKS)}]", f"harness.limit={LIMIT}"])
    leaf = resolve_tasks(cfg.harness).leaf_tasks
    cli_samples = {}
    for task in TASKS:
        rows = []
        for s in _samples(out, task):  # what EvaluationTracker.save_results_samples writes
            args = {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)} for i, arg in enumerate(s["arguments"])}
            rows.append(json.loads(json.dumps({**s, "arguments": args, "resps": sanitize_list(s["resps"])})))
        cli_samples[task] = rows
    results = {"results": {t: {} for t in TASKS}, "samples": cli_samples}
    add_gold_scores_from_samples(results, leaf)
    for task in ("ckpteval_mc", "ckpteval_mc_nodelim"):
        assert results["results"][task]["bpb,none"] == pytest.approx(result[f"harness/{task}/bpb"], rel=1e-12)
    assert "bpb,none" not in results["results"]["ckpteval_gen"]  # generative: needs the model (not in this process)

"""Per-checkpoint work a scan no longer repeats, each checked against the stock behaviour it replaces:

- loading a checkpoint builds the model without a random init (every tensor is read next): the loaded model
  equals `from_pretrained`'s exactly, buffers included, and the global RNG is left untouched;
- lm-eval's environment description (`git_hash`, `add_env_info`) is computed once per process: every results
  dict carries exactly what stock lm-eval computes, and metrics are those of a stock `simple_evaluate`;
- between the jobs of a scan, the survivors are frozen out of the garbage collector after the job's garbage
  was collected (nothing the job dropped is kept).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from ckpteval import app
from tests import factories

from ckpteval.tasks import TASKS_DIR  # noqa: E402 - the offline lm-eval tasks (package data)
SEED = 1234


@pytest.mark.parametrize("tie", [False, True])
def test_load_model_skips_random_init_and_equals_from_pretrained(tmp_path, tiny_tokenizer_dir, tie):
    from transformers import AutoModelForCausalLM

    from ckpteval.checkpoint import inspect_checkpoint, load_model

    ckpt = factories.make_hf_checkpoint(tmp_path / "step_7", tiny_tokenizer_dir, seed=3, tie=tie)
    reference = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    torch.manual_seed(99)
    rng = torch.get_rng_state()
    model = load_model(inspect_checkpoint(ckpt))
    assert torch.equal(torch.get_rng_state(), rng), "loading drew random numbers (a random init ran)"
    ours, theirs = dict(model.named_buffers()), dict(reference.named_buffers())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    state, ref_state = model.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    if tie:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_env_info_computed_once_and_equal_to_stock(tmp_path, tiny_hf_ckpt, monkeypatch):
    """Two harness jobs in one process: lm-eval's add_env_info runs once; both results.json carry what stock
    lm-eval computes (env info, git hash), and the metrics equal a stock simple_evaluate with HFLM."""
    import json

    from lm_eval import evaluator, simple_evaluate
    from lm_eval.loggers.utils import add_env_info, get_git_commit_hash
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ckpteval.evaluation import harness as glue

    calls = []
    monkeypatch.setattr(evaluator, "add_env_info", lambda storage: calls.append(1) or add_env_info(storage))
    monkeypatch.setattr(glue, "_ENV_INFO", {})
    monkeypatch.chdir(tmp_path)
    overrides = ["mode=harness", f"ckpt={tiny_hf_ckpt}", "harness=offline", f"harness.include_path={TASKS_DIR}",
                 "harness.tasks=[ckpteval_mc]", "harness.limit=8", "harness.batch_size=4", f"harness.seed={SEED}",
                 "tracking.enabled=false"]
    results = []
    for _ in range(2):  # outside Hydra the job's dir is cwd: each job rewrites lm_eval/step_120/.../results.json
        metrics = app.main(factories.compose(overrides))
        saved = json.loads(next((tmp_path / "lm_eval").rglob("results.json")).read_text())
        results.append((metrics, saved))
    assert len(calls) == 1, "add_env_info ran for every checkpoint"
    assert evaluator.add_env_info.__name__ == "<lambda>", "the patch was not undone after simple_evaluate"
    stock_env: dict = {}
    add_env_info(stock_env)
    for _, saved in results:
        assert {k: saved[k] for k in stock_env} == json.loads(json.dumps(stock_env))
        assert saved["git_hash"] == get_git_commit_hash()

    lm = HFLM(pretrained=str(tiny_hf_ckpt), batch_size=4, device="cpu", dtype="float32")
    ref = simple_evaluate(model=lm, tasks=["ckpteval_mc"], limit=8, log_samples=False,
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                          random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED, fewshot_random_seed=SEED)
    expected = {f"harness/ckpteval_mc/{key.split(',')[0]}": v for key, v in ref["results"]["ckpteval_mc"].items()
                if "," in key and isinstance(v, float)}
    for metrics, _ in results:
        assert expected and all(abs(metrics[k] - v) <= 1e-6 * max(1.0, abs(v)) for k, v in expected.items())


def test_freeze_survivors_collects_the_jobs_garbage_first():
    from ckpteval.scan import freeze_survivors

    class Node:
        pass

    dropped, kept = Node(), Node()
    dropped.self, kept.self = dropped, kept  # reference cycles: only the collector frees them
    gone, alive = weakref.ref(dropped), weakref.ref(kept)
    del dropped
    frozen_before = gc.get_freeze_count()
    try:
        freeze_survivors()
        assert gone() is None, "garbage of the job was frozen instead of collected"
        assert alive() is kept and gc.get_freeze_count() > frozen_before
        assert not any(o is kept for o in gc.get_objects(generation=2)), "a survivor is still walked by gc"
    finally:
        gc.unfreeze()

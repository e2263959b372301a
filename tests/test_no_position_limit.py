"""`max_position_embeddings: -1` in an HF config.json means "no limit" (OLMo-core's own HF export writes it; RoPE
has no limit), never a limit of -1: eval.seq_len checks, convert's verification batch and the harness's max_length
read it that way. The end-to-end check on OLMo-core's real export is in tests/test_formats_olmo_core.py."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from ckpteval.checkpoint import inspect_checkpoint
from ckpteval.checkpoint.convert import VERIFY_LEN, verification_batch
from ckpteval.checkpoint.formats import _common
from ckpteval.checkpoint.load import load_model, load_tokenizer
from ckpteval.errors import CkptEvalError
from ckpteval.evaluation.harness import build_lm
from ckpteval.modes.loss import check_eval_shapes
from tests import factories


@pytest.fixture(scope="module")
def unlimited_ckpt(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny Llama whose config.json transformers wrote with max_position_embeddings -1."""
    out = factories.make_hf_checkpoint(tmp_path_factory.mktemp("nolimit") / "step_5", tiny_tokenizer_dir, max_pos=-1)
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == -1
    return out


def test_position_limit_reads_minus_one_as_none():
    assert _common.position_limit(factories.llama_config(max_pos=-1)) is None
    assert _common.position_limit(factories.llama_config(max_pos=256)) == 256


def test_eval_seq_len_is_not_checked_against_minus_one(unlimited_ckpt):
    info = inspect_checkpoint(unlimited_ckpt)  # config.json validation accepts it
    config = load_model(info).config
    check_eval_shapes(OmegaConf.create({"eval": {"seq_len": 4096}}), config)
    with pytest.raises(CkptEvalError, match=r"beyond the model's 256 positions"):
        check_eval_shapes(OmegaConf.create({"eval": {"seq_len": 4096}}), factories.llama_config(max_pos=256))


def test_convert_verification_batch_is_full_length(unlimited_ckpt):
    assert verification_batch(factories.llama_config(max_pos=-1)).shape == (2, VERIFY_LEN)
    assert verification_batch(factories.llama_config(max_pos=8)).shape == (2, 8)


@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_harness_max_length_falls_back_like_lm_eval(unlimited_ckpt, backend):
    """lm-eval would read -1 as the max_length; the harness passes lm-eval's own fallback instead (the tokenizer's
    model_max_length, else 2048), and leaves a real limit alone."""
    info = inspect_checkpoint(unlimited_ckpt)
    model, tokenizer = load_model(info), load_tokenizer(info)
    hcfg = OmegaConf.create({"batch_size": 2, "dtype": None, "trust_remote_code": False, "prefix_cache_tokens": 0})
    assert build_lm(backend, model, tokenizer, hcfg, None).max_length == 2048
    model.config.max_position_embeddings = 64
    assert build_lm(backend, model, tokenizer, hcfg, None).max_length == 64

"""Checkpoint formats: HF (single, sharded), DCP (our trainer's nested layout with optimizer state, top-level
layout, config from the `model` group), step parsing, completeness checks, loss equal to the reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpteval import app
from ckpteval.checkpoint import check_complete, inspect_checkpoint, parse_step
from tests import factories

SEQ = 32


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _loss(tmp: Path, ckpt: Path, shards: Path, *extra: str) -> dict:
    return app.main(factories.compose(["mode=loss", f"ckpt={ckpt}", "data=local", f"data.dataset_path={shards}",
                                       f"eval.seq_len={SEQ}", "eval.batch_size=4", "eval.steps=-1",
                                       f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra]))


def _reference(model, shards: Path) -> float:
    arrays = [np.fromfile(f, dtype=np.uint16) for f in sorted(shards.glob("*.bin"))]
    return factories.reference_loss(model, arrays, SEQ)


def _save_dcp(path: Path, state: dict) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)))


def test_dcp_with_optimizer_state_and_config_beside(in_tmp, tiny_tokenizer_dir, tiny_token_shards):
    """Our trainer's layout: {"model", "optim", "rng"} in step_N/, config.json + tokenizer in the run dir."""
    model = factories.make_model(seed=5)
    run_dir = in_tmp / "run"
    step_dir = run_dir / "step_40"
    optim = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optim.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optim)
    _save_dcp(step_dir, {"model": model_sd, "optim": optim_sd, "rng": {"torch": torch.get_rng_state()}})
    model.config.save_pretrained(run_dir)
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", run_dir / "tokenizer.json")

    info = inspect_checkpoint(step_dir)
    assert (info.format, info.step, info.dcp_prefix, info.config_dir) == ("dcp", 40, "model.", run_dir)
    result = _loss(in_tmp, step_dir, tiny_token_shards)
    assert result["step"] == 40
    assert abs(result["eval/loss"] - _reference(model.eval(), tiny_token_shards)) < 1e-5


def test_dcp_top_level_names_config_from_model_group(in_tmp, tiny_token_shards):
    """torchtitan-like top-level names, no config.json anywhere: the architecture comes from model.* overrides."""
    model = factories.make_model(seed=6, tie=True)
    step_dir = in_tmp / "global_step7"
    _save_dcp(step_dir, {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    c = model.config
    arch = ["model.vocab_size=512", f"model.hidden_size={c.hidden_size}",
            f"model.intermediate_size={c.intermediate_size}", f"model.num_hidden_layers={c.num_hidden_layers}",
            f"model.num_attention_heads={c.num_attention_heads}",
            f"model.num_key_value_heads={c.num_key_value_heads}", "model.max_position_embeddings=256",
            f"model.rms_norm_eps={c.rms_norm_eps}", "model.tie_word_embeddings=true"]
    result = _loss(in_tmp, step_dir, tiny_token_shards, *arch)
    assert result["step"] == 7
    assert abs(result["eval/loss"] - _reference(model, tiny_token_shards)) < 1e-5


def test_dcp_wrong_architecture_is_one_clear_error(in_tmp, tiny_token_shards, capsys):
    model = factories.make_model(seed=1)
    step_dir = in_tmp / "run" / "step_9"
    _save_dcp(step_dir, {"model": model.state_dict(), "optim": {"state": {}}})
    config = model.config
    config.hidden_size = 96
    config.save_pretrained(in_tmp / "run")
    with pytest.raises(SystemExit):
        _loss(in_tmp, step_dir, tiny_token_shards)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "shape" in err[0] and "step_9" in err[0]


def test_sharded_safetensors_equal_single_file(in_tmp, tiny_tokenizer_dir, tiny_token_shards):
    model = factories.make_model(seed=2)
    sharded = in_tmp / "checkpoint-300"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    result = _loss(in_tmp, sharded, tiny_token_shards, f"tokenizer={tiny_tokenizer_dir}")
    assert result["step"] == 300
    assert abs(result["eval/loss"] - _reference(model, tiny_token_shards)) < 1e-5


def test_incomplete_hf_checkpoints_are_detected(in_tmp):
    model = factories.make_model(seed=3)
    sharded = in_tmp / "step_5"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert check_complete(sharded) == (True, "")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a copy cut short
    ok, reason = check_complete(sharded)
    assert not ok and "truncated" in reason
    shard.unlink()
    ok, reason = check_complete(sharded)
    assert not ok and "missing" in reason


@pytest.mark.parametrize("path,step", [("run/step_1200", 1200), ("run/step-1200", 1200), ("global_step1200", 1200),
                                       ("iter_0001200", 1200), ("out/checkpoint-1200", 1200),
                                       ("step_1200/model.gguf", 1200), ("final", None), ("run/mystep_12", None)])
def test_parse_step(path, step):
    assert parse_step(path) == step


def test_ckpteval_metadata_gives_tokens_seen(in_tmp, tiny_hf_ckpt, tiny_token_shards):
    ckpt = in_tmp / "latest"
    shutil.copytree(tiny_hf_ckpt, ckpt)
    (ckpt / "ckpteval.json").write_text(json.dumps({"step": 77, "tokens_seen": 12345}))
    result = _loss(in_tmp, ckpt, tiny_token_shards, "eval.steps=1")
    assert result["step"] == 77 and result["tokens_seen"] == 12345


def test_gguf_file_loss_equals_the_source_model(in_tmp, tiny_tokenizer_dir, tiny_token_shards):
    """A .gguf file (tokenizer beside it): loaded through transformers' GGUF loader, the step from its dir."""
    model = factories.make_model(seed=9)
    step_dir = in_tmp / "step_50"
    step_dir.mkdir()
    gguf_file = factories.write_llama_gguf(model, step_dir / "model.gguf")
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", step_dir / "tokenizer.json")
    info = inspect_checkpoint(gguf_file)
    assert (info.format, info.step, info.tokenizer_path) == ("gguf", 50, step_dir)
    result = _loss(in_tmp, gguf_file, tiny_token_shards)
    assert result["step"] == 50
    assert abs(result["eval/loss"] - _reference(model.eval(), tiny_token_shards)) < 1e-5


def test_truncated_gguf_is_one_clear_error(in_tmp, tiny_token_shards, capsys):
    step_dir = in_tmp / "step_60"
    step_dir.mkdir()
    data = factories.write_llama_gguf(factories.make_model(), step_dir / "model.gguf").read_bytes()
    (step_dir / "model.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as exc:
        _loss(in_tmp, step_dir / "model.gguf", tiny_token_shards)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint") and "incomplete or corrupt GGUF" in err[0], err

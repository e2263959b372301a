"""`ckpt_config=PATH`: the architecture of checkpoints saved without a config.json (fast tier: tiny HF / DCP dirs).

It is validated before anything loads, wins over every source the family knows, is still checked against the
checkpoint's tensors before allocating, and lets the watcher take a checkpoint whose run kept no config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ckpteval.checkpoint import inspect_checkpoint, load_model
from ckpteval.checkpoint.load import build_config, validated_model
from ckpteval.errors import CkptEvalError
from tests import factories


@pytest.mark.parametrize("content,match", [
    (None, r"ckpt_config=.* is not a config.json nor a dir holding one"),
    ("{not json", r"ckpt_config=.*is not valid JSON"),
    (json.dumps({"model_type": "not_a_model"}), r"ckpt_config=.* has model_type 'not_a_model', which this "),
])
def test_ckpt_config_is_validated_first(tiny_hf_ckpt, tmp_path, content, match):
    path = tmp_path / "run_config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CkptEvalError, match=match):
        inspect_checkpoint(tiny_hf_ckpt, ckpt_config=str(path))


def test_ckpt_config_wins_and_is_checked_against_the_tensors(tiny_hf_ckpt, tmp_path):
    reference = load_model(inspect_checkpoint(tiny_hf_ckpt))
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_hf_ckpt / "config.json", run / "config.json")
    info = inspect_checkpoint(tiny_hf_ckpt, ckpt_config=str(run))  # a dir holding config.json
    assert info.ckpt_config == (run / "config.json").resolve()
    build_config(info)
    assert info.arch_source == f"ckpt_config={run / 'config.json'}"
    model = load_model(info)
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(ours, theirs), name
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads((run / "config.json").read_text()), "hidden_size": 128}))
    info = inspect_checkpoint(tiny_hf_ckpt, ckpt_config=str(other))
    with pytest.raises(CkptEvalError, match=r"from ckpt_config=.*other.json: tensor shape mismatch .*"
                                            r"ckpt_config= names a different model"):
        validated_model(info)


def test_watcher_takes_ckpt_config_for_a_run_without_config(tmp_path, tiny_hf_ckpt):
    """A DCP step dir with no config.json in or beside it waits (no `model`-group fallback in the watcher); with
    ckpt_config= it is ready."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from ckpteval.watch.discovery import INCOMPLETE, READY, Discovery

    root = tmp_path / "ckpts"
    dcp.save({"model": load_file(str(tiny_hf_ckpt / "model.safetensors"))}, checkpoint_id=str(root / "step_10"),
             no_dist=True)
    [cand] = Discovery(str(root), stable_s=0.0).look()
    assert cand.state == INCOMPLETE and "architecture is not there yet" in cand.reason, cand.reason
    [cand] = Discovery(str(root), stable_s=0.0, ckpt_config=str(tiny_hf_ckpt / "config.json")).look()
    assert cand.state == READY, cand.reason


def test_model_group_error_names_ckpt_config(tmp_path):
    from ckpteval.checkpoint.formats._common import model_group_arch

    with pytest.raises(CkptEvalError, match=r"has no architecture source .*pass ckpt_config=PATH"):
        model_group_arch(None, Path(tmp_path), "FSDP", "no config.json")


def test_ckpt_config_in_the_config_schema():
    cfg = factories.compose(["ckpt_config=/some/config.json"])
    assert cfg.ckpt_config == "/some/config.json"
    assert factories.compose([]).ckpt_config is None

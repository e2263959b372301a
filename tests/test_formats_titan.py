"""torchtitan checkpoints written by torchtitan's own code (its Llama3 model, CheckpointManager, HF state-dict
adapter and job config dump; tests/framework_ckpts.py), read by the torchtitan family and scored against
torchtitan's OWN forward on the same windows (float32, 1e-5)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpteval.checkpoint.formats import detect_format, get_format
from ckpteval.checkpoint.formats import torchtitan as titan_fmt
from ckpteval.errors import CkptEvalError
from tests import factories, framework_ckpts

# The frameworks write their checkpoints in subprocesses (module fixtures): the end-to-end tier, not the fast one.
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _torchtitan():  # when a test here runs (not at collection: the default tier, which runs none, skips nothing)
    factories.require("torchtitan", "titan")

SEQ = 64


@pytest.fixture(scope="module")
def titan_run(tmp_path_factory, tiny_token_shards):
    """run/job_config.json, run/checkpoint/step-10 (DCP + optimizer), run/checkpoint/step-20 (HF export)."""
    out = tmp_path_factory.mktemp("titan") / "run"
    ref = framework_ckpts.run("titan", out, tiny_token_shards, SEQ)
    return out, ref


def _files(shards: Path) -> list[np.ndarray]:
    return [np.fromfile(f, dtype=np.uint16) for f in sorted(Path(shards).glob("*.bin"))]


def _our_loss(path: Path, shards: Path, model_cfg=None) -> tuple[float, str]:
    from transformers import AutoModelForCausalLM

    fmt = detect_format(path)
    arch = fmt.architecture(path, model_cfg)
    model = AutoModelForCausalLM.from_config(arch.config)
    model.load_state_dict(fmt.read_state(path, arch.config), strict=not arch.config.tie_word_embeddings)
    return factories.reference_loss(model.eval(), _files(shards), SEQ), arch.source


def test_titan_dcp_detected_complete_with_step_and_tokens(titan_run):
    run, _ = titan_run
    step10 = run / "checkpoint" / "step-10"
    fmt = detect_format(step10)
    assert fmt is not None and fmt.name == "torchtitan"
    fmt.check_complete(step10)
    assert fmt.step_tokens(step10) == (10, 10 * 8 * SEQ)  # train_state.step / ntokens_seen as the trainer saved


def test_titan_dcp_loss_equals_torchtitan_forward(titan_run, tiny_token_shards):
    run, ref = titan_run
    loss, source = _our_loss(run / "checkpoint" / "step-10", tiny_token_shards)
    assert "job_config.json" in source
    assert abs(loss - ref["loss"]) < 1e-5, (loss, ref)


def test_titan_mapping_equals_torchtitans_own_hf_adapter(titan_run):
    """Our names and RoPE layout are exactly what torchtitan's Llama3StateDictAdapter.to_hf produces."""
    run, _ = titan_run
    step10 = run / "checkpoint" / "step-10"
    fmt = get_format("torchtitan")
    ours = fmt.read_state(step10, fmt.architecture(step10).config)
    theirs = torch.load(run / "titan_to_hf.pt", weights_only=True)
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_titan_renaming_without_rope_permute_is_detectably_wrong(titan_run, tiny_token_shards, monkeypatch):
    """The trap: renaming alone runs but scores a different function. Our check must be able to see that."""
    run, ref = titan_run
    monkeypatch.setattr(titan_fmt, "rope_pairs_to_halves", lambda w, n_heads: w)
    loss, _ = _our_loss(run / "checkpoint" / "step-10", tiny_token_shards)
    assert abs(loss - ref["loss"]) > 1e-4, (loss, ref)


def test_titan_reads_only_model_tensors(titan_run, monkeypatch):
    run, _ = titan_run
    step10 = run / "checkpoint" / "step-10"
    asked: list[str] = []
    real = titan_fmt.read_dcp_tensors
    monkeypatch.setattr(titan_fmt, "read_dcp_tensors", lambda p, wanted: (asked.extend(wanted), real(p, wanted))[1])
    fmt = get_format("torchtitan")
    fmt.read_state(step10, fmt.architecture(step10).config)
    assert asked and all(k.startswith(("tok_embeddings.", "layers.", "norm.", "lm_head.", "output.")) for k in asked)
    meta = titan_fmt.dcp_metadata(step10).state_dict_metadata
    assert any(k.startswith("optimizer.") for k in meta) and not any(k.startswith("optimizer.") for k in asked)


def test_titan_hf_export_without_config_json(titan_run, tiny_token_shards):
    """last_save_in_hf: HF names, no config.json; the architecture comes from the job config up the tree."""
    run, ref = titan_run
    step20 = run / "checkpoint" / "step-20"
    assert not (step20 / "config.json").exists()
    fmt = detect_format(step20)
    assert fmt is not None and fmt.name == "torchtitan"
    fmt.check_complete(step20)
    assert fmt.step_tokens(step20) == (20, None)
    loss, source = _our_loss(step20, tiny_token_shards)
    assert "job_config.json" in source
    assert abs(loss - ref["loss"]) < 1e-5, (loss, ref)


def test_titan_tied_embeddings(tmp_path, tiny_token_shards):
    """enable_weight_tying=True: both tok_embeddings and lm_head are saved; one transformers tied head."""
    ref = framework_ckpts.run("titan", tmp_path / "run", tiny_token_shards, SEQ, "--tie")
    step = tmp_path / "run" / "checkpoint" / "step-10"
    assert get_format("torchtitan").architecture(step).config.tie_word_embeddings
    loss, _ = _our_loss(step, tiny_token_shards)
    assert abs(loss - ref["loss"]) < 1e-5, (loss, ref)

def test_titan_pre_03_names(titan_run, tmp_path, tiny_token_shards):
    """torchtitan before 0.3 named q/k/v `layers.{i}.attention.wq` (no `qkv_linear`) and the head `output`: the
    same tensors (torchtitan's own, from step-10) re-saved under those names with DCP give the same loss."""
    import torch.distributed.checkpoint as dcp

    run, ref = titan_run
    step10 = run / "checkpoint" / "step-10"
    meta = titan_fmt.dcp_metadata(step10).state_dict_metadata
    wanted = {k: m for k, m in meta.items() if titan_fmt._hf_name(k)}
    tensors = titan_fmt.read_dcp_tensors(step10, wanted)
    old = {k.replace("attention.qkv_linear.", "attention.").replace("lm_head.", "output."): v
           for k, v in tensors.items()}
    old["train_state"] = {"step": 10, "ntokens_seen": 5120}
    dest = tmp_path / "checkpoint" / "step-10"
    dcp.save(old, checkpoint_id=str(dest), no_dist=True)
    shutil.copy(run / "job_config.json", tmp_path / "job_config.json")
    assert any(".attention.wq." in k for k in titan_fmt.dcp_metadata(dest).state_dict_metadata)
    loss, _ = _our_loss(dest, tiny_token_shards)
    assert abs(loss - ref["loss"]) < 1e-5, (loss, ref)

def _copy_step(run: Path, dest: Path) -> Path:
    shutil.copytree(run / "checkpoint" / "step-10", dest / "checkpoint" / "step-10")
    return dest / "checkpoint" / "step-10"


@pytest.mark.parametrize("name", ["job_config.json", "config.toml"])
def test_titan_flavor_name_resolved_through_torchtitans_registry(titan_run, tmp_path, name):
    """A job config (JSON dump or launch TOML) naming only model.name/flavor is resolved by torchtitan's own
    registry; its debugmodel (dim 256, 6 layers) contradicts these tensors, and the error names both."""
    run, _ = titan_run
    step = _copy_step(run, tmp_path)
    text = (json.dumps({"model": {"name": "llama3", "flavor": "debugmodel"}}) if name.endswith(".json") else
            '[job]\ndump_folder = "."\n\n[model]\nname = "llama3"\nflavor = "debugmodel"\n')
    (tmp_path / name).write_text(text)
    with pytest.raises(CkptEvalError, match=r"contradicts .*flavor debugmodel.*registry") as e:
        get_format("torchtitan").architecture(step)
    assert "in the checkpoint but" in str(e.value)


def test_titan_flavor_without_torchtitan_importable_names_the_fix(titan_run, tmp_path, monkeypatch):
    run, _ = titan_run
    step = _copy_step(run, tmp_path)
    (tmp_path / "job_config.json").write_text(json.dumps({"model": {"name": "llama3", "flavor": "debugmodel"}}))
    monkeypatch.setitem(__import__("sys").modules, "torchtitan.models.llama3", None)  # import now raises
    with pytest.raises(CkptEvalError, match=r"flavor debugmodel, but torchtitan cannot be imported.*ckpteval\[titan\].*"
                                            r"config.json"):
        get_format("torchtitan").architecture(step)


def test_titan_without_architecture_source(titan_run, tmp_path, tiny_token_shards):
    """No config.json and no job config: the `model` group, checked against the tensors; without it an error
    naming the override."""
    from omegaconf import OmegaConf

    run, ref = titan_run
    step = _copy_step(run, tmp_path)
    with pytest.raises(CkptEvalError, match=r"no architecture source.*model="):
        get_format("torchtitan").architecture(step, None)
    group = OmegaConf.create({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512,
                              "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                              "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "extra": {}})
    loss, source = _our_loss(step, tiny_token_shards, group)
    assert "model` group" in source and abs(loss - ref["loss"]) < 1e-5
    group.hidden_size = 128
    with pytest.raises(CkptEvalError, match=r"contradicts .*model` group.*in the checkpoint but .* there: describe "
                                            r"the model with model\.\* overrides"):
        get_format("torchtitan").architecture(step, group)


def test_titan_incomplete_dirs_are_refused(titan_run, tmp_path):
    run, _ = titan_run
    step = _copy_step(run, tmp_path)
    distcp = next(step.glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:1000])
    with pytest.raises(CkptEvalError, match="truncated"):
        get_format("torchtitan").check_complete(step)
    (step / ".metadata").unlink()
    with pytest.raises(CkptEvalError, match="no .metadata"):
        get_format("torchtitan").check_complete(step)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_titan_crafted_metadata_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    step = tmp_path / "run" / "checkpoint" / "step-10"
    step.mkdir(parents=True)
    (step / "__0_0.distcp").write_bytes(b"\0" * 16)
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    fmt = detect_format(step)
    assert fmt is not None and fmt.name == "torchtitan"  # a step-N dir: claimed, then refused with a reason
    with pytest.raises(CkptEvalError, match=r"refusing to unpickle .*system"):
        fmt.check_complete(step)
    with pytest.raises(CkptEvalError, match=r"refusing to unpickle .*system"):
        fmt.step_tokens(step)
    assert not marker.exists()


def test_titan_crafted_metadata_through_mode_loss(tmp_path, tiny_token_shards, monkeypatch, capsys):
    from ckpteval import app

    marker = tmp_path / "PWNED"
    step = tmp_path / "run" / "checkpoint" / "step-10"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        app.main(_loss_cfg(tmp_path, step, tiny_token_shards))
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "refusing to unpickle" in err[0] and "system" in err[0], err
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- through the app


def _loss_cfg(tmp: Path, ckpt: Path, shards: Path, *extra: str):
    return factories.compose(["mode=loss", f"ckpt={ckpt}", "data=local", f"data.dataset_path={shards}",
                              f"eval.seq_len={SEQ}", "eval.batch_size=8", "eval.steps=-1",
                              f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra])


@pytest.mark.parametrize("step", [10, 20])
def test_titan_mode_loss_equals_torchtitan_forward(titan_run, step, tmp_path, tiny_token_shards, monkeypatch):
    from ckpteval import app

    run, ref = titan_run
    monkeypatch.chdir(tmp_path)
    result = app.main(_loss_cfg(tmp_path, run / "checkpoint" / f"step-{step}", tiny_token_shards))
    assert result["step"] == step
    assert abs(result["eval/loss"] - ref["loss"]) < 1e-5, (result, ref)


def test_titan_mode_convert_loads_in_stock_transformers(titan_run, tmp_path, tiny_token_shards, monkeypatch):
    from transformers import AutoModelForCausalLM

    from ckpteval import app

    run, ref = titan_run
    monkeypatch.chdir(tmp_path)
    result = app.main(factories.compose(["mode=convert", f"ckpt={run / 'checkpoint' / 'step-10'}",
                                         f"convert.out={tmp_path / 'hf'}", f"tracking.uri=sqlite:///{tmp_path}/m.db"]))
    hf_dir = Path(result["convert/out"])
    assert (hf_dir / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert abs(factories.reference_loss(model, _files(tiny_token_shards), SEQ) - ref["loss"]) < 1e-5


def test_titan_watch_once(titan_run, tmp_path, tiny_token_shards, monkeypatch):
    run, ref = titan_run
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run, tmp_path / "run")
    summary, losses = framework_ckpts.watch_once_losses(tmp_path / "run" / "checkpoint", tiny_token_shards, SEQ,
                                                        tmp_path / "m.db")
    assert summary["watch/evaluated"] == 2 and summary["watch/failed"] == 0, summary
    assert set(losses) == {"step-10", "step-20"}
    assert all(abs(v - ref["loss"]) < 1e-5 for v in losses.values()), losses


@pytest.mark.slow
def test_titan_glob_scan_cli(titan_run, tmp_path, tiny_token_shards):
    run, ref = titan_run
    shutil.copytree(run, tmp_path / "run")
    points = framework_ckpts.glob_scan_points(tmp_path, "run/checkpoint/step-*", tiny_token_shards, SEQ, jobs=2)
    assert set(points) == {"step-10", "step-20"}
    for name, (step, loss) in points.items():
        assert step == int(name.split("-")[1]) and abs(loss - ref["loss"]) < 1e-5, name


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_titan_torchrun_layouts(titan_run, layout, tmp_path, tiny_token_shards):
    run, ref = titan_run
    loss = framework_ckpts.torchrun_loss(run / "checkpoint/step-10", layout, tiny_token_shards, SEQ, tmp_path)
    assert abs(loss - ref["loss"]) < 1e-5, (loss, ref)


def test_titan_mode_harness_fast_equals_stock_lm_eval(titan_run, tmp_path, tiny_tokenizer_dir, tiny_token_shards,
                                                   monkeypatch):
    run, ref = titan_run
    monkeypatch.chdir(tmp_path)
    framework_ckpts.assert_harness_equals_stock(run, "checkpoint/step-10", tmp_path, tiny_tokenizer_dir, _files(tiny_token_shards),
                                                SEQ, ref["loss"], step=10)

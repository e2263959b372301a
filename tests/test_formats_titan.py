"""torchtitan checkpoints written by torchtitan's own code (its Llama3 model, CheckpointManager, HF state-dict
adapter and job config dump; tests/framework_ckpts.py), read by the torchtitan family and scored against
torchtitan's OWN forward on the same windows (float32, 1e-5)."""

from __future__ import annotations

import functools
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
_files = factories.shard_arrays
_our_loss = functools.partial(factories.family_loss, seq_len=SEQ)
_loss_cfg = functools.partial(factories.loss_cfg, seq_len=SEQ)


@pytest.fixture(scope="module")
def titan_run(tmp_path_factory, tiny_token_shards):
    """run/job_config.json, run/checkpoint/step-10 (DCP + optimizer), run/checkpoint/step-20 (HF export)."""
    out = tmp_path_factory.mktemp("titan") / "run"
    ref = framework_ckpts.run("titan", out, tiny_token_shards, SEQ)
    return out, ref


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
    meta = titan_fmt.read_dcp_metadata(step10).state_dict_metadata
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
    meta = titan_fmt.read_dcp_metadata(step10).state_dict_metadata
    wanted = {k: m for k, m in meta.items() if titan_fmt._hf_name(k)}
    tensors = titan_fmt.read_dcp_tensors(step10, wanted)
    old = {k.replace("attention.qkv_linear.", "attention.").replace("lm_head.", "output."): v
           for k, v in tensors.items()}
    old["train_state"] = {"step": 10, "ntokens_seen": 5120}
    dest = tmp_path / "checkpoint" / "step-10"
    dcp.save(old, checkpoint_id=str(dest), no_dist=True)
    shutil.copy(run / "job_config.json", tmp_path / "job_config.json")
    assert any(".attention.wq." in k for k in titan_fmt.read_dcp_metadata(dest).state_dict_metadata)
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
    framework_ckpts.assert_harness_equals_stock(run, "checkpoint/step-10", tmp_path, tiny_tokenizer_dir,
                                                _files(tiny_token_shards), SEQ, ref["loss"], step=10)


# ---------------------------------------------------------------------------------------------- MoE (Qwen3-MoE)


@pytest.fixture(scope="module")
def titan_moe_runs(tmp_path_factory, tiny_token_shards):
    """Both torchtitan MoE models, written by one subprocess (framework_ckpts.py titan-moe)."""
    out = tmp_path_factory.mktemp("titan_moe")
    return out, framework_ckpts.run("titan-moe", out, tiny_token_shards, SEQ, timeout=600)


@pytest.fixture(scope="module")
def titan_moe_run(titan_moe_runs):
    """torchtitan's Qwen3-MoE (2 layers, 8 experts, top-2, softmax + route_norm, an expert_bias that changes
    routing): run/checkpoint/step-10 (DCP), run/checkpoint/step-20 (its HF export), run/job_config.json."""
    out, refs = titan_moe_runs
    return out / "qwen3", refs["qwen3"]


def _moe_model(path: Path):
    from ckpteval.checkpoint import inspect_checkpoint, load_model

    return load_model(inspect_checkpoint(path))


def batch_loss(model, shards: Path, seq: int = SEQ) -> float:
    """Mean next-token loss of every window in one plain transformers forward (same windows and weights as
    `factories.reference_loss`, one batch: MoE layers loop over experts, so per-window forwards are slow)."""
    w = framework_ckpts.windows(shards, seq)
    with torch.no_grad():
        return framework_ckpts.mean_loss(model(input_ids=w[:, :-1]).logits, w[:, 1:])


def test_titan_moe_dcp_loss_equals_torchtitan_forward(titan_moe_run, tiny_token_shards):
    from tests.test_hf_conversion import routed_experts

    run, ref = titan_moe_run
    step10 = run / "checkpoint" / "step-10"
    fmt = detect_format(step10)
    assert fmt is not None and fmt.name == "torchtitan" and fmt.step_tokens(step10) == (10, 10 * 8 * SEQ)
    model = _moe_model(step10)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.num_experts_per_tok == 2
    loss = batch_loss(model, tiny_token_shards)
    assert abs(loss - ref["loss"]) < 1e-5, (loss, ref)
    # the comparison means something: tokens take different experts, and the bias changed some choices
    assert len(ref["experts_chosen"]) >= 2
    batch = torch.from_numpy(_files(tiny_token_shards)[0][: 2 * SEQ].astype(np.int64)).view(2, SEQ)
    assert len(routed_experts(model, batch)) >= 2
    assert abs(ref["loss_without_expert_bias"] - ref["loss"]) > 1e-3


@pytest.mark.parametrize("detail", ["dropped_expert_bias", "no_renormalisation", "bias_on_logits"])
def test_titan_moe_wrong_router_detail_is_detectably_wrong(titan_moe_run, tiny_token_shards, detail):
    """Each way of getting torchtitan's router slightly wrong moves the loss well beyond the 1e-5 tolerance."""
    import torch.nn.functional as F

    run, ref = titan_moe_run
    model = _moe_model(run / "checkpoint" / "step-10")
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    assert routers and all(type(r).__name__ == "TrainerRouter" for r in routers)
    for r in routers:
        if detail == "dropped_expert_bias":
            r.e_score_correction_bias.zero_()
        elif detail == "no_renormalisation":
            r.route_norm = False
        else:  # the bias added to the logits instead of the softmax probabilities
            def forward(h, r=r):
                logits = F.linear(h.reshape(-1, r.hidden_dim), r.weight)
                probs = F.softmax(logits, dtype=torch.float, dim=-1)
                idx = torch.topk(logits + r.e_score_correction_bias, r.top_k, dim=-1)[1]
                w = probs.gather(-1, idx)
                return logits, w / w.sum(-1, keepdim=True), idx
            r.forward = forward
    loss = batch_loss(model, tiny_token_shards)
    assert abs(loss - ref["loss"]) > 1e-4, (detail, loss, ref)
    if detail == "dropped_expert_bias":  # = torchtitan's own forward with its bias zeroed
        assert abs(loss - ref["loss_without_expert_bias"]) < 1e-5, (loss, ref)


def test_titan_moe_mapping_equals_torchtitans_own_hf_adapter(titan_moe_run):
    """Our hub layout is exactly torchtitan's Qwen3StateDictAdapter.to_hf, plus the expert bias it drops."""
    run, _ = titan_moe_run
    step10 = run / "checkpoint" / "step-10"
    fmt = get_format("torchtitan")
    ours = fmt.read_state(step10, fmt.architecture(step10).config)
    theirs = torch.load(run / "titan_to_hf.pt", weights_only=True)
    assert set(ours) - set(theirs) == {f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in range(2)}
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_titan_moe_hf_export_is_what_it_holds(titan_moe_run, tiny_token_shards, caplog):
    """torchtitan's own HF export drops the expert_bias: read as written (a warning says so), its loss is
    torchtitan's forward with the bias zeroed."""
    run, ref = titan_moe_run
    with caplog.at_level("WARNING"):
        model = _moe_model(run / "checkpoint" / "step-20")
    assert any("drops the aux-loss-free expert_bias" in r.message for r in caplog.records)
    loss = batch_loss(model, tiny_token_shards)
    assert abs(loss - ref["loss_without_expert_bias"]) < 1e-5, (loss, ref)


def _edit_job(run: Path, dest: Path, edit) -> Path:
    step = _copy_step(run, dest)
    job = json.loads((run / "job_config.json").read_text())
    for layer in job["model_spec"]["model"]["layers"]:
        edit(layer["moe"])
    (dest / "job_config.json").write_text(json.dumps(job))
    return step


@pytest.mark.parametrize("edit, message", [
    (lambda moe: moe["router"].update(score_func="sigmoid"), r"score_func=sigmoid"),
    (lambda moe: moe["router"].update(route_scale=2.5), r"route_scale=2\.5"),
    (lambda moe: moe["routed_experts"]["token_dispatcher"].update(non_blocking_capacity_factor=1.0),
     r"non_blocking_capacity_factor=1\.0 \(drops tokens"),
])
def test_titan_moe_routers_transformers_cannot_compute_are_refused(titan_moe_run, tmp_path, edit, message):
    run, _ = titan_moe_run
    step = _edit_job(run, tmp_path, edit)
    with pytest.raises(CkptEvalError, match=r"torchtitan MoE router .*" + message + r".*Qwen3-MoE .*not supported"):
        get_format("torchtitan").architecture(step)


def test_titan_moe_malformed_job_config_is_one_error(titan_moe_run, tmp_path):
    """A dump missing a field (or one transformers' strict config validation rejects) is one error, not a
    traceback."""
    run, _ = titan_moe_run
    step = _edit_job(run, tmp_path, lambda moe: moe["router"].pop("top_k"))
    with pytest.raises(CkptEvalError, match=r"job_config\.json .* does not describe a qwen3 model transformers can "
                                            r"build \(KeyError: 'top_k'\): put a transformers config\.json"):
        get_format("torchtitan").architecture(step)


def test_titan_moe_without_architecture_source_is_one_error_line(titan_moe_run, tmp_path, tiny_token_shards,
                                                                 monkeypatch, capsys):
    """The issue's traceback (`intermediate_size ... NoneType`): now one line naming the source and the fix (the
    app's default `model` group is the last source, and it contradicts these tensors)."""
    from ckpteval import app

    run, _ = titan_moe_run
    step = _copy_step(run, tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        app.main(_loss_cfg(tmp_path, step, tiny_token_shards, "tracking.enabled=false"))
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "contradicts its architecture source, the `model` group" in err[0], err
    assert "describe the model with model.* overrides, or put its config.json beside the checkpoint" in err[0], err


def test_titan_moe_unknown_model_tensor_is_named(titan_moe_run, tmp_path):
    import torch.distributed.checkpoint as dcp

    run, _ = titan_moe_run
    step10 = run / "checkpoint" / "step-10"
    meta = titan_fmt.read_dcp_metadata(step10).state_dict_metadata
    tensors = titan_fmt.read_dcp_tensors(step10, {k: m for k, m in meta.items() if k.startswith(("tok_", "layers."))})
    tensors["layers.0.moe.router.temperature"] = torch.ones(1)
    dest = tmp_path / "checkpoint" / "step-10"
    dcp.save(tensors, checkpoint_id=str(dest), no_dist=True)
    with pytest.raises(CkptEvalError, match=r"holds layers\.0\.moe\.router\.temperature, which has no transformers "
                                            r"qwen3 counterpart"):
        get_format("torchtitan").tensor_specs(dest, None)


def test_titan_moe_convert_and_watch(titan_moe_run, tmp_path, tiny_token_shards, monkeypatch, capsys):
    """mode=convert refuses the DCP step in one line (its routing is not any transformers class's) and converts the
    HF export, which stock transformers loads; the watcher (the job path mode=loss runs) scores both steps."""
    from transformers import AutoModelForCausalLM

    from ckpteval import app

    run, ref = titan_moe_run
    monkeypatch.chdir(tmp_path)
    convert = ["mode=convert", f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    with pytest.raises(SystemExit) as exc:
        app.main(factories.compose([*convert, f"ckpt={run / 'checkpoint' / 'step-10'}",
                                    f"convert.out={tmp_path / 'hf10'}"]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "expert bias" in err[0] and "Nothing was written" in err[0]
    assert not (tmp_path / "hf10").exists()
    out = app.main(factories.compose([*convert, f"ckpt={run / 'checkpoint' / 'step-20'}",
                                      f"convert.out={tmp_path / 'hf20'}"]))
    model = AutoModelForCausalLM.from_pretrained(out["convert/out"], dtype=torch.float32).eval()
    loss = batch_loss(model, tiny_token_shards)
    assert abs(loss - ref["loss_without_expert_bias"]) < 1e-5

    shutil.copytree(run, tmp_path / "run")
    summary, losses = framework_ckpts.watch_once_losses(tmp_path / "run" / "checkpoint", tiny_token_shards, SEQ,
                                                        tmp_path / "w.db")
    assert summary["watch/evaluated"] == 2 and summary["watch/failed"] == 0, summary
    assert abs(losses["step-10"] - ref["loss"]) < 1e-5 and abs(losses["step-20"] - ref["loss_without_expert_bias"]) \
        < 1e-5, losses


def test_titan_moe_harness_fast_equals_lm_eval_on_the_same_model(titan_moe_run, tmp_path, tiny_tokenizer_dir,
                                                                 monkeypatch):
    """harness.backend=fast on the DCP step = lm-eval's own HFLM given the model we load (convert refuses it)."""
    run, _ = titan_moe_run
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    shutil.copytree(run, root)
    for f in Path(tiny_tokenizer_dir).iterdir():
        shutil.copy(f, root / f.name)
    ours, stock = framework_ckpts.harness_vs_hflm(root / "checkpoint" / "step-10", tmp_path)
    assert stock and ours["step"] == 10
    for key, value in stock.items():  # perplexities of a random model are ~1e9: 1e-5 relative = 1e-5 in log-lik.
        assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


@pytest.mark.slow
@pytest.mark.dist
def test_titan_moe_torchrun_fsdp(titan_moe_run, tmp_path, tiny_token_shards):
    run, ref = titan_moe_run
    loss = framework_ckpts.torchrun_loss(run / "checkpoint/step-10", "fsdp", tiny_token_shards, SEQ, tmp_path)
    assert abs(loss - ref["loss"]) < 1e-5, (loss, ref)


# ---------------------------------------------------------------------------------------------- MoE (DeepSeek-V3)


@pytest.fixture(scope="module")
def titan_ds_run(titan_moe_runs):
    """torchtitan's DeepSeek-V3 (MLA with a q LoRA, yarn RoPE, 1 dense + 1 MoE layer, 8 experts, top-2, a shared
    expert, an expert_bias): run/sigmoid (node-limited groups, route_norm, route_scale 2.5: DeepSeek-V3's recipe)
    and run/softmax (torchtitan's debugmodel recipe), each checkpoint/step-10 + job_config.json."""
    out, refs = titan_moe_runs
    return out / "deepseek", refs["deepseek"]


@pytest.mark.parametrize("variant, router", [("sigmoid", "DeepseekV3TopkRouter"), ("softmax", "TrainerRouter")])
def test_titan_deepseek_loss_equals_torchtitan_forward(titan_ds_run, variant, router, tiny_token_shards):
    from tests.test_hf_conversion import routed_experts

    run, refs = titan_ds_run
    model = _moe_model(run / variant / "checkpoint" / "step-10")
    assert type(model).__name__ == "DeepseekV3ForCausalLM" and model.config.q_lora_rank == 32
    assert [type(m).__name__ for n, m in model.named_modules() if n.endswith("mlp.gate")] == [router]
    loss = batch_loss(model, tiny_token_shards)
    assert abs(loss - refs[variant]["loss"]) < 1e-5, (variant, loss, refs[variant])
    batch = framework_ckpts.windows(tiny_token_shards, SEQ)[:2, :-1]
    assert len(routed_experts(model, batch)) >= 2


def test_titan_deepseek_mapping_and_router_details(titan_ds_run, tiny_token_shards):
    """Our hub layout is torchtitan's own DeepSeekV3StateDictAdapter.to_hf (it keeps the expert bias); zeroing the
    bias gives torchtitan's loss without it, and dropping the node-limited groups is detectably wrong."""
    run, refs = titan_ds_run
    step = run / "sigmoid" / "checkpoint" / "step-10"
    fmt = get_format("torchtitan")
    ours = fmt.read_state(step, fmt.architecture(step).config)
    theirs = torch.load(run / "sigmoid" / "titan_to_hf.pt", weights_only=True)
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    model = _moe_model(step)
    gate = model.model.layers[1].mlp.gate
    bias = gate.e_score_correction_bias.clone()
    gate.e_score_correction_bias.zero_()
    loss = batch_loss(model, tiny_token_shards)
    assert abs(loss - refs["sigmoid"]["loss_without_expert_bias"]) < 1e-5
    assert abs(loss - refs["sigmoid"]["loss"]) > 1e-3
    gate.e_score_correction_bias.copy_(bias)
    gate.num_group = gate.topk_group = 1  # every expert eligible: torchtitan limits each token to 1 of 2 groups
    assert abs(batch_loss(model, tiny_token_shards) - refs["sigmoid"]["loss"]) > 1e-4


def test_titan_deepseek_convert(titan_ds_run, tmp_path, tiny_token_shards, monkeypatch, capsys):
    """The sigmoid recipe is stock DeepSeek-V3: mode=convert writes an HF dir stock transformers loads with
    torchtitan's loss; the softmax recipe (TrainerRouter) is refused by convert in one line."""
    from transformers import AutoModelForCausalLM

    from ckpteval import app

    run, refs = titan_ds_run
    monkeypatch.chdir(tmp_path)
    out = app.main(factories.compose(["mode=convert", f"ckpt={run / 'sigmoid' / 'checkpoint' / 'step-10'}",
                                      f"convert.out={tmp_path / 'hf'}", f"tracking.uri=sqlite:///{tmp_path}/m.db"]))
    model = AutoModelForCausalLM.from_pretrained(out["convert/out"], dtype=torch.float32).eval()
    assert abs(batch_loss(model, tiny_token_shards) - refs["sigmoid"]["loss"]) < 1e-5
    with pytest.raises(SystemExit) as exc:
        app.main(factories.compose(["mode=convert", f"ckpt={run / 'softmax' / 'checkpoint' / 'step-10'}",
                                    f"convert.out={tmp_path / 'hf_softmax'}",
                                    f"tracking.uri=sqlite:///{tmp_path}/m.db"]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "no transformers class" in err[0], err
    assert not (tmp_path / "hf_softmax").exists()


def test_titan_deepseek_trained_without_expert_bias(titan_ds_run, tmp_path, tiny_token_shards):
    """load_balance_coeff=None: no expert_bias_E in the checkpoint; DeepSeek-V3's bias at zero gives torchtitan's
    own loss with its bias zeroed."""
    import torch.distributed.checkpoint as dcp

    run, refs = titan_ds_run
    src = run / "sigmoid" / "checkpoint" / "step-10"
    meta = titan_fmt.read_dcp_metadata(src).state_dict_metadata
    tensors = titan_fmt.read_dcp_tensors(src, {k: m for k, m in meta.items() if hasattr(m, "size")
                                               and k.startswith(("tok_", "layers.", "norm.", "lm_head."))
                                               and not k.endswith("expert_bias_E")})
    dest = tmp_path / "checkpoint" / "step-10"
    dcp.save(tensors, checkpoint_id=str(dest), no_dist=True)
    job = json.loads((run / "sigmoid" / "job_config.json").read_text())
    for layer in job["model_spec"]["model"]["layers"]:
        if layer.get("moe"):
            layer["moe"]["load_balance_coeff"] = None
    (tmp_path / "job_config.json").write_text(json.dumps(job))
    model = _moe_model(dest)
    assert abs(batch_loss(model, tiny_token_shards) - refs["sigmoid"]["loss_without_expert_bias"]) < 1e-5

"""Megatron-Core checkpoints written by Megatron's own code (a `GPTModel` from its local layer spec, saved with
`dist_checkpointing.save`, torch_dist backend; tests/framework_ckpts.py), read by the megatron family and scored
against Megatron's OWN forward on the same windows (float32, 1e-5).

On this CPU-only torch, Megatron-Core needs three CUDA calls answered (see `framework_ckpts._megatron_cpu_shims`:
`torch.cuda.current_device` for RoPE's inv_freq, `torch.cuda.synchronize` in the saver, the CUDA RNG tracker's
fork around attention dropout); the model, its forward and its saver are otherwise Megatron's own."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ckpteval.checkpoint.formats import detect_format, get_format
from ckpteval.checkpoint.formats import megatron as mg_fmt
from ckpteval.errors import CkptEvalError
from tests import factories, framework_ckpts

# The frameworks write their checkpoints in subprocesses (module fixtures): the end-to-end tier, not the fast one.
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _megatron():  # when a test here runs (not at collection: the default tier, which runs none, skips nothing)
    factories.require("megatron.core", "megatron")

SEQ = 64
_files = factories.shard_arrays
_our_loss = functools.partial(factories.family_loss, seq_len=SEQ)
_loss_cfg = functools.partial(factories.loss_cfg, seq_len=SEQ)


@pytest.fixture(scope="module")
def mg_run(tmp_path_factory, tiny_token_shards):
    """run/iter_0000010 (common.pt with args) and run/latest_checkpointed_iteration.txt."""
    out = tmp_path_factory.mktemp("megatron") / "run"
    ref = framework_ckpts.run("megatron", out, tiny_token_shards, SEQ)
    return out, ref


def test_megatron_detected_complete_with_step(mg_run):
    run, _ = mg_run
    ckpt = run / "iter_0000010"
    fmt = detect_format(ckpt)
    assert fmt is not None and fmt.name == "megatron"
    fmt.check_complete(ckpt)
    assert fmt.step_tokens(ckpt) == (10, None)


def test_megatron_loss_equals_megatron_forward(mg_run, tiny_token_shards):
    run, ref = mg_run
    loss, source = _our_loss(run / "iter_0000010", tiny_token_shards)
    assert "Megatron args" in source
    assert abs(loss - ref["loss"]) < 1e-5, (loss, ref)


def test_megatron_specs_match_state_and_only_model_tensors_are_read(mg_run, monkeypatch):
    run, _ = mg_run
    ckpt = run / "iter_0000010"
    fmt = get_format("megatron")
    config = fmt.architecture(ckpt).config
    asked: list[str] = []
    real = mg_fmt.read_dcp_tensors
    monkeypatch.setattr(mg_fmt, "read_dcp_tensors", lambda p, wanted: (asked.extend(wanted), real(p, wanted))[1])
    state = fmt.read_state(ckpt, config)
    assert {k: tuple(v.shape) for k, v in state.items()} == fmt.tensor_specs(ckpt, config)
    assert "decoder.layers.self_attention.linear_qkv.weight" in asked  # stacked [L, ...]
    assert not any("_extra_state" in k for k in asked)
    # the fused fc1 split: gate is the first half, as Megatron's SwiGLU (silu(x[:ffn]) * x[ffn:]) reads it
    fc1 = real(ckpt, {k: m for k, m in mg_fmt.read_dcp_metadata(ckpt).state_dict_metadata.items()
                      if k == "decoder.layers.mlp.linear_fc1.weight"})["decoder.layers.mlp.linear_fc1.weight"]
    assert torch.equal(state["model.layers.1.mlp.gate_proj.weight"], fc1[1, :160])
    assert torch.equal(state["model.layers.1.mlp.up_proj.weight"], fc1[1, 160:])


def test_megatron_tied_embeddings(tmp_path, tiny_token_shards):
    """share_embeddings_and_output_weights=True (args: untie_embeddings_and_output_weights=False)."""
    ref = framework_ckpts.run("megatron", tmp_path / "run", tiny_token_shards, SEQ, "--tie")
    loss, source = _our_loss(tmp_path / "run" / "iter_0000010", tiny_token_shards)
    assert "Megatron args" in source and abs(loss - ref["loss"]) < 1e-5, (loss, ref)
    assert get_format("megatron").architecture(tmp_path / "run" / "iter_0000010").config.tie_word_embeddings

def _copy(run: Path, dest: Path, name: str = "iter_0000010") -> Path:
    shutil.copytree(run / "iter_0000010", dest / name)
    return dest / name


def _write_common(ckpt: Path, **changes) -> None:
    args = framework_ckpts.megatron_args(tie=False)
    for k, v in changes.items():
        setattr(args, k, v)
    torch.save({"args": args, "iteration": 10, "checkpoint_version": 3.0}, ckpt / "common.pt")


def test_megatron_args_contradicting_tensors_name_both(mg_run, tmp_path):
    run, _ = mg_run
    ckpt = _copy(run, tmp_path)
    _write_common(ckpt, num_query_groups=4)
    with pytest.raises(CkptEvalError, match=r"linear_qkv has 128 rows.*4 query groups"):
        get_format("megatron").architecture(ckpt)
    _write_common(ckpt, ffn_hidden_size=128)
    with pytest.raises(CkptEvalError, match=r"contradicts .*Megatron args.*in the checkpoint but .* there: fix or "
                                            r"remove that config"):
        get_format("megatron").architecture(ckpt)
    _write_common(ckpt, normalization="LayerNorm", swiglu=False)
    with pytest.raises(CkptEvalError, match=r"swiglu=False, normalization=LayerNorm.*Llama-style"):
        get_format("megatron").architecture(ckpt)


def test_megatron_without_args_uses_config_json_then_model_group(mg_run, tmp_path, tiny_token_shards):
    from omegaconf import OmegaConf

    run, ref = mg_run
    ckpt = _copy(run, tmp_path, "release")  # no iteration in the name: the step comes from common.pt
    torch.save({"iteration": 10, "checkpoint_version": 3.0}, ckpt / "common.pt")
    assert get_format("megatron").step_tokens(ckpt) == (10, None)
    with pytest.raises(CkptEvalError, match=r"no architecture source.*model="):
        get_format("megatron").architecture(ckpt, None)
    group = OmegaConf.create({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512,
                              "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                              "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "extra": {}})
    loss, source = _our_loss(ckpt, tiny_token_shards, group)
    assert "model` group" in source and abs(loss - ref["loss"]) < 1e-5
    from ckpteval.checkpoint import config_from_model_cfg

    config_from_model_cfg(group).save_pretrained(tmp_path)  # config.json beside the dir wins over the group
    loss, source = _our_loss(ckpt, tiny_token_shards, None)
    assert source.startswith("config.json in") and abs(loss - ref["loss"]) < 1e-5


def test_megatron_step_from_latest_file(mg_run, tmp_path):
    run, _ = mg_run
    ckpt = _copy(run, tmp_path, "release")
    torch.save({"checkpoint_version": 3.0}, ckpt / "common.pt")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10\n")
    assert get_format("megatron").step_tokens(ckpt) == (10, None)


def test_megatron_incomplete_dirs_are_refused(mg_run, tmp_path):
    run, _ = mg_run
    ckpt = _copy(run, tmp_path)
    shard = max(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CkptEvalError, match="truncated"):
        get_format("megatron").check_complete(ckpt)
    (ckpt / "common.pt").unlink()
    with pytest.raises(CkptEvalError, match="common.pt is missing"):
        get_format("megatron").check_complete(ckpt)
    (ckpt / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(CkptEvalError, match="zarr.*torch_dist"):
        get_format("megatron").check_complete(ckpt)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_megatron_crafted_common_pt_runs_nothing(mg_run, tmp_path):
    run, _ = mg_run
    marker = tmp_path / "PWNED"
    ckpt = _copy(run, tmp_path)
    torch.save({"args": argparse.Namespace(evil=_Payload(marker)), "iteration": 10}, ckpt / "common.pt")
    fmt = detect_format(ckpt)
    assert fmt is not None and fmt.name == "megatron"
    for call in (lambda: fmt.architecture(ckpt), lambda: fmt.read_state(ckpt, None), lambda: fmt.step_tokens(ckpt)):
        with pytest.raises(CkptEvalError, match=r"refusing to unpickle .*common.pt.*system"):
            call()
    assert not marker.exists()


def test_megatron_crafted_metadata_runs_nothing(tmp_path):
    import pickle

    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "iter_0000010"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    torch.save({"iteration": 10}, ckpt / "common.pt")
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    fmt = detect_format(ckpt)
    assert fmt is not None and fmt.name == "megatron"
    for call in (lambda: fmt.check_complete(ckpt), lambda: fmt.architecture(ckpt)):
        with pytest.raises(CkptEvalError, match=r"refusing to unpickle .*\.metadata.*system"):
            call()
    assert not marker.exists()

# ---------------------------------------------------------------------------------------------- through the app


def test_megatron_mode_loss_equals_megatron_forward(mg_run, tmp_path, tiny_token_shards, monkeypatch):
    from ckpteval import app

    run, ref = mg_run
    monkeypatch.chdir(tmp_path)
    result = app.main(_loss_cfg(tmp_path, run / "iter_0000010", tiny_token_shards))
    assert result["step"] == 10
    assert abs(result["eval/loss"] - ref["loss"]) < 1e-5, (result, ref)


def test_megatron_mode_convert_loads_in_stock_transformers(mg_run, tmp_path, tiny_token_shards, monkeypatch):
    from transformers import AutoModelForCausalLM

    from ckpteval import app

    run, ref = mg_run
    monkeypatch.chdir(tmp_path)
    result = app.main(factories.compose(["mode=convert", f"ckpt={run / 'iter_0000010'}",
                                         f"convert.out={tmp_path / 'hf'}", f"tracking.uri=sqlite:///{tmp_path}/m.db"]))
    hf_dir = Path(result["convert/out"])
    assert (hf_dir / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert abs(factories.reference_loss(model, _files(tiny_token_shards), SEQ) - ref["loss"]) < 1e-5


def test_megatron_watch_once(mg_run, tmp_path, tiny_token_shards, monkeypatch):
    run, ref = mg_run
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run, tmp_path / "run")
    summary, losses = framework_ckpts.watch_once_losses(tmp_path / "run", tiny_token_shards, SEQ, tmp_path / "m.db")
    assert summary["watch/evaluated"] == 1 and summary["watch/failed"] == 0, summary
    assert set(losses) == {"iter_0000010"} and abs(losses["iter_0000010"] - ref["loss"]) < 1e-5, losses


@pytest.mark.slow
def test_megatron_glob_scan_cli(mg_run, tmp_path, tiny_token_shards):
    run, ref = mg_run
    shutil.copytree(run, tmp_path / "run")
    shutil.copytree(run / "iter_0000010", tmp_path / "run" / "iter_0000020")  # a second step, same weights
    points = framework_ckpts.glob_scan_points(tmp_path, "run/iter_*", tiny_token_shards, SEQ, jobs=2)
    assert set(points) == {"iter_0000010", "iter_0000020"}
    for name, (step, loss) in points.items():
        assert step == int(name.split("_")[1]) and abs(loss - ref["loss"]) < 1e-5, name


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_megatron_torchrun_layouts(mg_run, layout, tmp_path, tiny_token_shards):
    run, ref = mg_run
    loss = framework_ckpts.torchrun_loss(run / "iter_0000010", layout, tiny_token_shards, SEQ, tmp_path)
    assert abs(loss - ref["loss"]) < 1e-5, (loss, ref)


def test_megatron_mode_harness_fast_equals_stock_lm_eval(mg_run, tmp_path, tiny_tokenizer_dir, tiny_token_shards,
                                                   monkeypatch):
    run, ref = mg_run
    monkeypatch.chdir(tmp_path)
    framework_ckpts.assert_harness_equals_stock(run, "iter_0000010", tmp_path, tiny_tokenizer_dir,
                                                _files(tiny_token_shards), SEQ, ref["loss"], step=10)


# ---------------------------------------------------------------------------------------------- MoE


@pytest.fixture(scope="module")
def mg_moe_run(tmp_path_factory, tiny_token_shards):
    """OUT/{mixtral,qwen2_moe,glm4_moe}/iter_0000010: Megatron GPTModels with 4 experts, top-2, SequentialMLP
    experts, one router kind each (framework_ckpts.MEGATRON_MOE), and Megatron's own forward loss per variant."""
    out = tmp_path_factory.mktemp("megatron_moe")
    refs = framework_ckpts.run("megatron-moe", out, tiny_token_shards, SEQ, timeout=600)
    return out, refs


def _moe_model(path: Path):
    from ckpteval.checkpoint import inspect_checkpoint, load_model

    return load_model(inspect_checkpoint(path))


def batch_loss(model, shards: Path) -> float:
    """Mean next-token loss of every window in one plain transformers forward (the windows and weights of
    `factories.reference_loss`, in one batch)."""
    w = framework_ckpts.windows(shards, SEQ)
    with torch.no_grad():
        return framework_ckpts.mean_loss(model(input_ids=w[:, :-1]).logits, w[:, 1:])


@pytest.mark.parametrize("variant, cls", [("mixtral", "MixtralForCausalLM"), ("qwen2_moe", "Qwen2MoeForCausalLM"),
                                          ("glm4_moe", "Glm4MoeForCausalLM")])
def test_megatron_moe_loss_equals_megatron_forward(mg_moe_run, variant, cls, tiny_token_shards):
    from tests.test_hf_conversion import routed_experts

    out, refs = mg_moe_run
    ckpt = out / variant / "iter_0000010"
    fmt = detect_format(ckpt)
    assert fmt is not None and fmt.name == "megatron" and fmt.step_tokens(ckpt) == (10, None)
    model = _moe_model(ckpt)
    assert type(model).__name__ == cls
    loss = batch_loss(model, tiny_token_shards)
    assert abs(loss - refs[variant]["loss"]) < 1e-5, (variant, loss, refs[variant])
    assert len(refs[variant]["experts_chosen"]) >= 2  # Megatron's own router spreads tokens over experts
    batch = framework_ckpts.windows(tiny_token_shards, SEQ)[:2, :-1]
    assert len(routed_experts(model, batch)) >= 2


def test_megatron_moe_specs_match_state(mg_moe_run):
    out, _ = mg_moe_run
    fmt = get_format("megatron")
    for variant in ("mixtral", "qwen2_moe", "glm4_moe"):
        ckpt = out / variant / "iter_0000010"
        config = fmt.architecture(ckpt).config
        state = fmt.read_state(ckpt, config)
        assert {k: tuple(v.shape) for k, v in state.items()} == fmt.tensor_specs(ckpt, config), variant
    # Megatron's expert fc1 is [gate; up] per expert, as its SwiGLU reads it (silu(x[:F]) * x[F:])
    raw = mg_fmt.read_dcp_tensors(ckpt, {k: m for k, m in mg_fmt.read_dcp_metadata(ckpt).state_dict_metadata.items()
                                         if k == "decoder.layers.mlp.experts.experts.linear_fc1.weight"})
    fc1 = raw["decoder.layers.mlp.experts.experts.linear_fc1.weight"]  # [L, E, 2F, H]
    assert torch.equal(state["model.layers.1.mlp.experts.3.gate_proj.weight"], fc1[1, 3, :48])
    assert torch.equal(state["model.layers.1.mlp.experts.3.up_proj.weight"], fc1[1, 3, 48:])


def _routers(model):
    return [m for n, m in model.named_modules() if n.endswith(("mlp.gate", "block_sparse_moe.gate"))]


def test_megatron_moe_wrong_router_details_are_detectably_wrong(mg_moe_run, tmp_path, tiny_token_shards):
    """Softmax before instead of after the top-k, no renormalisation, a dropped expert_bias: each moves the loss
    well past the 1e-5 tolerance (and the dropped bias lands on Megatron's own loss without it)."""
    import torch.nn.functional as F

    out, refs = mg_moe_run
    # no renormalisation over the top k (Mixtral's router, minus its last step)
    model = _moe_model(out / "mixtral" / "iter_0000010")
    for r in _routers(model):
        def forward(h, r=r):
            logits = F.linear(h.reshape(-1, r.hidden_dim), r.weight)
            top, idx = torch.topk(F.softmax(logits.float(), dim=-1), r.top_k, dim=-1)
            return logits, top, idx
        r.forward = forward
    assert abs(batch_loss(model, tiny_token_shards) - refs["mixtral"]["loss"]) > 1e-4
    # the args say softmax after the top-k (moe_router_pre_softmax=False) for the pre-softmax checkpoint
    ckpt = _copy(out / "qwen2_moe", tmp_path, "iter_0000010")
    args = mg_fmt._args(mg_fmt.read_common(ckpt))
    torch.save({"args": argparse.Namespace(**{**args, "moe_router_pre_softmax": False}), "iteration": 10,
                "checkpoint_version": 3.0}, ckpt / "common.pt")
    wrong = _moe_model(ckpt)
    assert wrong.config.norm_topk_prob and not _moe_model(out / "qwen2_moe" / "iter_0000010").config.norm_topk_prob
    assert abs(batch_loss(wrong, tiny_token_shards) - refs["qwen2_moe"]["loss"]) > 1e-4
    # the expert_bias dropped: Megatron's own loss with its bias zeroed, not the checkpoint's
    model = _moe_model(out / "glm4_moe" / "iter_0000010")
    for r in _routers(model):
        r.e_score_correction_bias.zero_()
    loss = batch_loss(model, tiny_token_shards)
    assert abs(loss - refs["glm4_moe"]["loss_without_expert_bias"]) < 1e-5
    assert abs(loss - refs["glm4_moe"]["loss"]) > 1e-3


@pytest.mark.parametrize("variant, changes, message", [
    ("mixtral", {"moe_expert_capacity_factor": 1.0}, r"moe_expert_capacity_factor=1\.0 \(drops tokens over capacity"),
    ("mixtral", {"moe_input_jitter_eps": 0.01}, r"random noise, at evaluation too"),
    ("mixtral", {"moe_router_pre_softmax": True}, r"Mixtral renormalises"),
    ("mixtral", {"moe_router_load_balancing_type": "sinkhorn"}, r"sinkhorn"),
    ("qwen2_moe", {"moe_shared_expert_gate": False}, r"ungated shared expert with a softmax router"),
    ("glm4_moe", {"moe_router_num_groups": 2, "moe_router_group_topk": 1}, r"group-limited routing"),
])
def test_megatron_moe_routers_transformers_cannot_compute_are_refused(mg_moe_run, tmp_path, variant, changes,
                                                                     message):
    out, _ = mg_moe_run
    ckpt = _copy(out / variant, tmp_path, "iter_0000010")
    args = mg_fmt._args(mg_fmt.read_common(ckpt))
    torch.save({"args": argparse.Namespace(**{**args, **changes}), "iteration": 10, "checkpoint_version": 3.0},
               ckpt / "common.pt")
    with pytest.raises(CkptEvalError, match=r"Megatron MoE router with .*" + message + r".*not supported"):
        get_format("megatron").architecture(ckpt)


def test_megatron_moe_watch_convert_and_harness(mg_moe_run, tmp_path, tiny_tokenizer_dir, tiny_token_shards,
                                               monkeypatch):
    """GLM-4-MoE (sigmoid + expert_bias + shared expert): the watcher (the job path mode=loss runs) scores it with
    Megatron's loss; harness.backend=fast = stock lm-eval on its mode=convert output, which stock transformers
    loads with Megatron's loss."""
    from transformers import AutoModelForCausalLM

    out, refs = mg_moe_run
    ref = refs["glm4_moe"]
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    shutil.copytree(out / "glm4_moe", root)
    summary, losses = framework_ckpts.watch_once_losses(root, tiny_token_shards, SEQ, tmp_path / "w.db")
    assert summary["watch/evaluated"] == 1 and summary["watch/failed"] == 0, summary
    assert abs(losses["iter_0000010"] - ref["loss"]) < 1e-5, losses
    for f in Path(tiny_tokenizer_dir).iterdir():
        shutil.copy(f, root / f.name)
    ours, stock, hf_dir = framework_ckpts.harness_vs_stock(root / "iter_0000010", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "Glm4MoeForCausalLM" and abs(batch_loss(model, tiny_token_shards) - ref["loss"]) < 1e-5
    assert stock and ours["step"] == 10
    for key, value in stock.items():  # perplexities of a random model are ~1e3..1e9: 1e-5 relative
        assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


@pytest.mark.slow
def test_megatron_moe_glob_scan_cli(mg_moe_run, tmp_path, tiny_token_shards):
    """One scan over the three router kinds (three transformers classes), each child = Megatron's own loss."""
    out, refs = mg_moe_run
    for variant in refs:
        shutil.copytree(out / variant / "iter_0000010", tmp_path / "runs" / variant / "iter_0000010")
    points = framework_ckpts.glob_scan_points(tmp_path, "runs/*/iter_*", tiny_token_shards, SEQ, jobs=3,
                                              key=lambda ckpt: Path(ckpt).parent.name)
    assert set(points) == set(refs)
    for variant, (step, loss) in points.items():
        assert step == 10 and abs(loss - refs[variant]["loss"]) < 1e-5, variant


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("layout", ["fsdp", "ep"])
def test_megatron_moe_torchrun_layouts(mg_moe_run, layout, tmp_path, tiny_token_shards):
    """parallel=fsdp (experts sharded with the rest) and parallel=ep (2 experts per rank, tokens all-to-all over
    gloo) on GLM-4-MoE (sigmoid router with expert_bias, shared expert): Megatron's own loss."""
    out, refs = mg_moe_run
    loss = framework_ckpts.torchrun_loss(out / "glm4_moe" / "iter_0000010", layout, tiny_token_shards, SEQ, tmp_path)
    assert abs(loss - refs["glm4_moe"]["loss"]) < 1e-5, (layout, loss, refs["glm4_moe"])


def test_megatron_moe_sigmoid_router_without_expert_bias(mg_moe_run, tmp_path, tiny_token_shards):
    """A sigmoid router trained without `moe_router_enable_expert_bias` has no bias tensor: GLM-4-MoE's at zero,
    Megatron's own loss with its bias zeroed."""
    import json as _json

    import torch.distributed.checkpoint as dcp

    out, refs = mg_moe_run
    src = out / "glm4_moe" / "iter_0000010"
    meta = mg_fmt.read_dcp_metadata(src).state_dict_metadata
    tensors = mg_fmt.read_dcp_tensors(src, {k: m for k, m in meta.items()
                                            if k.startswith(mg_fmt.MODEL_PREFIXES) and "_extra_state" not in k
                                            and not k.endswith("router.expert_bias") and hasattr(m, "size")})
    dest = tmp_path / "iter_0000010"
    dcp.save(tensors, checkpoint_id=str(dest), no_dist=True)
    (dest / "metadata.json").write_text(_json.dumps({"sharded_backend": "torch_dist"}))
    args = mg_fmt._args(mg_fmt.read_common(src))
    torch.save({"args": argparse.Namespace(**{**args, "moe_router_enable_expert_bias": False}), "iteration": 10},
               dest / "common.pt")
    model = _moe_model(dest)
    assert type(model).__name__ == "Glm4MoeForCausalLM"
    assert abs(batch_loss(model, tiny_token_shards) - refs["glm4_moe"]["loss_without_expert_bias"]) < 1e-5

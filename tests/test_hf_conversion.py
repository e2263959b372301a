"""HF dirs of architectures whose transformers class converts weights on load (transformers 5's MoE classes hold
fused `experts.gate_up_proj [E, 2I, H]`, the hub files per-expert `experts.{j}.w1` / `gate_proj`): names and
shapes are checked after transformers' own conversion and the weights loaded through it, so our model equals
`from_pretrained`'s, logit for logit. Dense classes we already read go through the same seam."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpteval.checkpoint import inspect_checkpoint, load_model
from ckpteval.errors import CkptEvalError
from tests import factories

SMALL = {"vocab_size": factories.VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "max_position_embeddings": 256, "tie_word_embeddings": False}


def _configs() -> dict:
    import transformers as T

    moe = {"num_key_value_heads": 2, "intermediate_size": 96, "num_experts_per_tok": 2}
    return {
        "mixtral": T.MixtralConfig(**SMALL, **moe, num_local_experts=4),
        "qwen3_moe": T.Qwen3MoeConfig(**SMALL, **moe, moe_intermediate_size=48, num_experts=8, norm_topk_prob=True,
                                      head_dim=16),
        "qwen2_moe": T.Qwen2MoeConfig(**SMALL, **moe, moe_intermediate_size=48, num_experts=4,
                                      shared_expert_intermediate_size=80),
        "olmoe": T.OlmoeConfig(**SMALL, **moe, num_experts=8),
        # MLA + 1 dense layer + a sigmoid router with a selection bias (e_score_correction_bias) and groups
        "deepseek_v3": T.DeepseekV3Config(**SMALL, **{**moe, "num_key_value_heads": 4}, moe_intermediate_size=32,
                                          n_routed_experts=8,
                                          n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                                          q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                          v_head_dim=16, routed_scaling_factor=2.5),
        "llama": factories.llama_config(),
        "qwen2": T.Qwen2Config(**SMALL, num_key_value_heads=2, intermediate_size=96),
        "gpt2": T.GPT2Config(vocab_size=factories.VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    }


def _save(config, out: Path, seed: int) -> Path:
    """A randomly initialised model of `config` saved by its own save_pretrained (hub layout); routers and
    selection biases perturbed so that tokens spread over several experts."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape) * 0.3)
            elif name.endswith(("gate.weight", "router.weight")) and t.dim() == 2 and t.shape[0] <= 16:
                t.mul_(40.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hfconv")
    return {name: _save(cfg, root / name, seed) for seed, (name, cfg) in enumerate(_configs().items())}


def _hub_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("name", list(_configs()))
def test_logits_equal_from_pretrained(saved, name):
    from transformers import AutoModelForCausalLM

    path = saved[name]
    ours = load_model(inspect_checkpoint(path))
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if name in ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3"):  # the file is per-expert, the model fused
        assert any(".experts.0." in k for k in _hub_keys(path)), name
        assert any(k.endswith("experts.gate_up_proj") for k in ours.state_dict()), name
    batch = torch.randint(0, factories.VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(batch).logits - ref(batch).logits).abs().max().item()
    assert diff == 0.0, (name, diff)
    for (k, a), (k2, b) in zip(sorted(ours.state_dict().items()), sorted(ref.state_dict().items()), strict=True):
        assert k == k2 and torch.equal(a, b), k


def routed_experts(model, batch) -> set[int]:
    """Experts chosen for any token of `batch` in the last MoE layer: the indices transformers' own router hands its
    experts module (`experts(hidden, top_k_index, top_k_weights)`)."""
    chosen: set[int] = set()
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    handle = experts[-1].register_forward_pre_hook(lambda _m, args: chosen.update(args[1].flatten().tolist()))
    with torch.no_grad():
        model(batch)
    handle.remove()
    return chosen


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_routing_differs_across_tokens(saved, name):
    """The logits comparison above means something only if tokens take different experts."""
    model = load_model(inspect_checkpoint(saved[name]))
    batch = torch.randint(0, factories.VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    assert len(routed_experts(model, batch)) >= 2, name


def test_mode_loss_on_a_hub_moe_dir(saved, tmp_path, tiny_token_shards, monkeypatch):
    """The issue's case: a Mixtral dir with per-expert tensors was refused by the pre-load check. mode=loss = a plain
    from_pretrained forward over the same windows (one batch: the windows of factories.reference_loss)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from ckpteval import app

    monkeypatch.chdir(tmp_path)
    result = app.main(factories.compose(["mode=loss", f"ckpt={saved['mixtral']}", "data=local",
                                         f"data.dataset_path={tiny_token_shards}", "eval.seq_len=64",
                                         "eval.batch_size=8", "eval.steps=-1", "tracking.enabled=false"]))
    ref = AutoModelForCausalLM.from_pretrained(str(saved["mixtral"]), dtype=torch.float32).eval()
    windows = [torch.from_numpy(a[k * 64: k * 64 + 65].astype(np.int64))
               for a in (np.fromfile(f, dtype=np.uint16) for f in sorted(Path(tiny_token_shards).glob("*.bin")))
               for k in range((len(a) - 1) // 64)]
    w = torch.stack(windows)
    with torch.no_grad():
        logits = ref(input_ids=w[:, :-1]).logits
    loss = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)).item()
    assert abs(result["eval/loss"] - loss) < 1e-6, (result, loss)


def _rewrite(src: Path, dest: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    dest.mkdir()
    (dest / "config.json").write_text((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("case", ["missing_expert", "odd_expert_shape", "fewer_experts_in_config"])
def test_broken_moe_dirs_are_one_clear_error_before_allocating(saved, tmp_path, case, monkeypatch):
    from ckpteval.checkpoint import load as load_mod

    src = saved["mixtral"]
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    if case == "missing_expert":
        path = _rewrite(src, tmp_path / case, lambda s: s.pop(key))
        expect = r"model\.layers\.1\.mlp\.experts\.down_proj \(3, 64, 96\) vs \(4, 64, 96\)"
    elif case == "odd_expert_shape":
        path = _rewrite(src, tmp_path / case, lambda s: s.update({key: torch.zeros(64, 95)}))
        expect = r"model\.layers\.1\.mlp\.experts\.down_proj .*MergeModulelist"
    else:
        path = _rewrite(src, tmp_path / case, lambda s: None)
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 2}))
        expect = r"experts\.gate_up_proj \(4, 192, 64\) vs \(2, 192, 64\)"
    allocated: list = []
    real = load_mod.build_model
    monkeypatch.setattr(load_mod, "build_model", lambda c, device="cpu", *a, **k: (
        allocated.append(str(device)), real(c, device, *a, **k))[1])
    with pytest.raises(CkptEvalError, match=r"does not match its architecture from config\.json.*" + expect) as e:
        load_model(inspect_checkpoint(path))
    assert "\n" not in str(e.value) and allocated == ["meta"], (str(e.value), allocated)

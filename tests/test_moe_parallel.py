"""parallel=ep (expert parallelism) checks that need no process group: sizes and models it refuses, in one line
each, before anything starts (the exact-loss runs under torchrun are in test_formats_megatron.py)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ckpteval.errors import CkptEvalError
from ckpteval.parallel.ep import check_ep, ep_plan
from ckpteval.parallel.mesh import resolve_mesh_dims
from tests import factories


def _parallel(name: str, **kw):
    return OmegaConf.create({"name": name, "dp": -1, "tp": 1, "pp": 1, "ep": 1, **kw})


def test_ep_mesh_sizes():
    assert resolve_mesh_dims(_parallel("ep", ep=2), 4).shape == (4, 1, 1)  # every rank its own windows
    with pytest.raises(CkptEvalError, match=r"world size 3 is not divisible by parallel\.ep=2"):
        resolve_mesh_dims(_parallel("ep", ep=2), 3)
    with pytest.raises(CkptEvalError, match=r"parallel\.ep=2 does not apply to parallel=fsdp"):
        resolve_mesh_dims(_parallel("fsdp", ep=2), 2)
    with pytest.raises(CkptEvalError, match=r"parallel\.tp=2 does not apply to parallel=ep"):
        resolve_mesh_dims(_parallel("ep", ep=2, tp=2), 4)


def test_ep_needs_experts_it_can_split():
    from transformers import MixtralConfig

    with pytest.raises(CkptEvalError, match=r"model_type=llama has none .*use parallel=fsdp"):
        check_ep(factories.llama_config(), 2)
    mixtral = MixtralConfig(num_local_experts=4)
    check_ep(mixtral, 2)
    with pytest.raises(CkptEvalError, match=r"parallel\.ep=3 does not divide the model's 4 experts"):
        check_ep(mixtral, 3)


def test_ep_plan_is_transformers_plan_over_the_model():
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    config = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
                              n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                              first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8,
                              qk_rope_head_dim=4, v_head_dim=8)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plan = ep_plan(model)  # layer 0 is dense: only layers 1 and 2 have experts
    assert plan == {f"model.layers.{i}.mlp.experts{p}": s for i in (1, 2) for p, s in
                    ((".gate_up_proj", "grouped_gemm"), (".down_proj", "grouped_gemm"), ("", "ep_dispatch_experts"))}

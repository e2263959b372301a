"""Expert parallelism: each MoE layer's experts split over groups of `parallel.ep` ranks, tokens sent to the rank
that holds their expert and back (all-to-all), everything else replicated; every rank evaluates its own windows.

    torchrun --nproc_per_node=2 run.py mode=loss parallel=ep parallel.ep=2 ckpt=PATH ...
    torchrun --nproc_per_node=4 run.py mode=loss parallel=ep parallel.ep=2 ckpt=PATH ...   # 2 groups of 2

transformers' own expert parallelism does the work (`apply_expert_parallelism` with the class's
`base_model_ep_plan`: `grouped_gemm` shards `experts.gate_up_proj` / `down_proj` on dim 0, `ep_dispatch_experts`
dispatches each (token, expert) pair with `all_to_all_single` and combines the results on the sender, weighted in
the same order as one process does), so the loss is the single-process loss to float rounding, gloo included.
"""

from __future__ import annotations

import re

from torch import nn

from ckpteval.errors import CkptEvalError


def num_experts(config) -> int | None:
    """The routed experts per MoE layer of a transformers config (None for a dense model)."""
    for attr in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def ep_plan(model: nn.Module) -> dict[str, str]:
    """The class's `base_model_ep_plan` expanded over the model's own parameter and module names."""
    plan = getattr(model.config, "base_model_ep_plan", None) or {}
    prefix = model.base_model_prefix + "."
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules()]
    out = {}
    for pattern, style in plan.items():
        rx = re.compile("^" + re.escape(prefix + pattern).replace(r"\*", r"\d+") + "$")
        out.update({n: style for n in names if rx.match(n)})
    return out


def check_ep(model_config, ep: int) -> None:
    experts = num_experts(model_config)
    if experts is None or not getattr(model_config, "base_model_ep_plan", None):
        raise CkptEvalError(f"parallel=ep splits the experts of a mixture-of-experts model; model_type="
                            f"{model_config.model_type} has none (or no expert-parallel plan in transformers): use "
                            "parallel=fsdp")
    if experts % ep:
        raise CkptEvalError(f"parallel.ep={ep} does not divide the model's {experts} experts: choose an "
                            "expert-parallel degree that divides it")


def apply_ep(model: nn.Module, ep: int, device_type: str, tp_mesh) -> nn.Module:
    """Split `model`'s experts over groups of `ep` consecutive ranks (in place); `tp_mesh` is this rank alone (the
    ranks holding its batch)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    check_ep(model.config, ep)
    world = dist.get_world_size()
    mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("ep_replica", "ep"))
    return apply_expert_parallelism(model, mesh["ep"], tp_mesh, ep_plan(model))

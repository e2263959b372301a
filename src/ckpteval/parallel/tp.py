"""Tensor parallel: DTensor plans for Llama-family decoders over the "tp" dim of the mesh.

    torchrun --nproc_per_node=2 run.py mode=loss parallel=tp ckpt=PATH ...        # tp=2
    torchrun --nproc_per_node=4 run.py mode=loss parallel=tp parallel.tp=2 ...    # tp=2 x dp=2

q/k/v and gate/up are split by output features (colwise), o and down by input features (rowwise, one
all-reduce each), so every rank holds num_heads/tp query heads and num_key_value_heads/tp KV heads. The
transformers attention modules reshape with `view(*shape, -1, head_dim)`, so the per-rank head count follows
from the local tensor and no module attribute needs rewriting. Embeddings, norms and the LM head stay whole
(replicated), so the loss head and scorer are the plain ones.
"""

from __future__ import annotations

from torch import nn

from ckpteval.errors import CkptEvalError

LAYER_PLAN_COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
LAYER_PLAN_ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


def layer_plan() -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {**{name: ColwiseParallel() for name in LAYER_PLAN_COLWISE},
            **{name: RowwiseParallel() for name in LAYER_PLAN_ROWWISE}}


def apply_tp(model: nn.Module, tp_mesh) -> nn.Module:
    """Shard every decoder layer of `model` (a transformers causal LM) over `tp_mesh`, in place."""
    from torch.distributed.tensor.parallel import parallelize_module

    layers = model.get_decoder().layers
    missing = _missing(layers[0])
    if missing:
        raise CkptEvalError(f"parallel=tp needs Llama-family layers (q/k/v/o_proj, gate/up/down_proj); "
                            f"model_type={model.config.model_type} lacks {missing}: use parallel=fsdp")
    for layer in layers:
        parallelize_module(layer, tp_mesh, layer_plan())
    return model


def _missing(layer: nn.Module) -> list[str]:
    names = {n for n, _ in layer.named_modules()}
    return [n for n in (*LAYER_PLAN_COLWISE, *LAYER_PLAN_ROWWISE) if n not in names]

"""Mixture-of-experts helpers shared by the trainer families: grouped expert tensors split into the hub's
per-expert names, and routing a trainer computes that no transformers class does, done exactly.

Grouped experts: torchtitan's `w1_EFD [E, F, D]` / `w3_EFD` / `w2_EDF [E, D, F]` and Megatron's stacked experts are
split into `mlp.experts.{j}.gate_proj / up_proj / down_proj` (`block_sparse_moe.experts.{j}.w1 / w3 / w2` for
Mixtral), the layout `save_pretrained` writes; transformers' own conversion fuses them back on load.

Routing: torchtitan's Qwen3-MoE router (and Megatron's with `moe_router_enable_expert_bias` and a softmax score)
balances load without an auxiliary loss (https://arxiv.org/abs/2408.15664): a rule-updated `expert_bias` is added
to the softmax probabilities to CHOOSE the top-k experts, while the weights of the chosen experts are the
probabilities themselves (renormalised over the k when the router normalises). transformers' softmax routers
(Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE) have no such bias and its biased routers (DeepSeek-V3, GLM-4-MoE, ...) score
with a sigmoid, so a checkpoint whose bias is non-zero would route differently in every stock class. A family that
reads one sets `config.ckpteval_softmax_selection_bias = True`, and `build_model` puts a `SelectionBiasRouter` in
place of each `mlp.gate` (same weight, same outputs, plus the bias as `mlp.gate.e_score_correction_bias`, the name
DeepSeek-V3 checkpoints give theirs). Such a model evaluates exactly in memory (loss, harness, scans, watcher,
FSDP); `mode=convert` refuses it, since stock transformers would load its HF dir with another routing.

Imports nothing of `ckpteval` (a leaf, like `_common`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FLAG = "ckpteval_softmax_selection_bias"
# transformers model types whose `mlp.gate` is a softmax top-k router `SelectionBiasRouter` stands in for
SOFTMAX_ROUTER_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


class SelectionBiasRouter(nn.Module):
    """Softmax top-k routing whose expert choice adds `e_score_correction_bias` to the probabilities; drop-in for a
    transformers softmax router (`forward` returns its (logits, top-k weights, top-k indices))."""

    not_in_transformers = ("its router adds an aux-loss-free expert bias to softmax probabilities to choose experts, "
                           "which no transformers class does")

    def __init__(self, router: nn.Module, norm_topk_prob: bool):
        super().__init__()
        self.top_k, self.num_experts, self.hidden_dim = router.top_k, router.num_experts, router.hidden_dim
        self.norm_topk_prob = norm_topk_prob
        self.weight = router.weight
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32,
                                                                    device=router.weight.device))

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        _, indices = torch.topk(probs + self.e_score_correction_bias, self.top_k, dim=-1)
        weights = probs.gather(-1, indices)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return router_logits, weights.to(router_logits.dtype), indices


# hub names of one expert's projections, per transformers model type (gate, up, down)
EXPERT_NAMES = {"mixtral": ("block_sparse_moe.experts.{j}.w1.weight", "block_sparse_moe.experts.{j}.w3.weight",
                            "block_sparse_moe.experts.{j}.w2.weight")}
DEFAULT_EXPERT_NAMES = ("mlp.experts.{j}.gate_proj.weight", "mlp.experts.{j}.up_proj.weight",
                        "mlp.experts.{j}.down_proj.weight")


def split_experts(layer_prefix: str, model_type: str, gate, up, down) -> dict:
    """Per-expert hub tensors of one layer from grouped `[E, F, D]` gate/up and `[E, D, F]` down tensors (views;
    meta tensors give shapes only)."""
    names = EXPERT_NAMES.get(model_type, DEFAULT_EXPERT_NAMES)
    out = {}
    for j in range(gate.shape[0]):
        for name, t in zip(names, (gate, up, down), strict=True):
            out[layer_prefix + name.format(j=j)] = t[j]
    return out


def apply_routing(model: nn.Module) -> nn.Module:
    """Replace each softmax `mlp.gate` by a `SelectionBiasRouter` when the config asks for it (in place)."""
    config = model.config
    if not getattr(config, CONFIG_FLAG, False):
        return model
    # Mixtral's router always renormalises; Qwen-MoE's and OLMoE's when norm_topk_prob
    norm = bool(getattr(config, "norm_topk_prob", config.model_type == "mixtral"))
    for name, module in list(model.named_modules()):
        gate = getattr(module, "gate", None)
        if name.endswith(".mlp") and gate is not None and hasattr(gate, "top_k") and hasattr(gate, "weight"):
            module.gate = SelectionBiasRouter(gate, norm)
    return model


def not_in_transformers(config) -> str | None:
    """Why stock transformers would compute another function than the model `config` builds here, None when it
    would not (a config, so that mode=convert refuses before anything is allocated)."""
    return SelectionBiasRouter.not_in_transformers if getattr(config, CONFIG_FLAG, False) else None

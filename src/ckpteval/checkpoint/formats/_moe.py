"""Mixture-of-experts helpers shared by the trainer families: grouped expert tensors split into the hub's
per-expert names, and routing a trainer computes that no transformers class does, done exactly.

Grouped experts: torchtitan's `w1_EFD [E, F, D]` / `w3_EFD` / `w2_EDF [E, D, F]` and Megatron's stacked experts are
split into `mlp.experts.{j}.gate_proj / up_proj / down_proj` (`block_sparse_moe.experts.{j}.w1 / w3 / w2` for
Mixtral), the layout `save_pretrained` writes; transformers' own conversion fuses them back on load.

Routing: torchtitan's router (and Megatron's sigmoid one) balances load without an auxiliary loss
(https://arxiv.org/abs/2408.15664): a rule-updated `expert_bias` is added to the scores to CHOOSE the top-k
experts, while the weights of the chosen experts are the scores themselves (renormalised over the k when the
router normalises, then scaled). transformers' biased routers (DeepSeek-V3, GLM-4-MoE, ...) all score with a
sigmoid and its softmax routers (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2) have no bias, so a softmax
router whose bias is non-zero (torchtitan's Qwen3-MoE and DeepSeek-V3 softmax recipes) routes differently in every
stock class. A family that reads one sets `config.ckpteval_router = {"score_func", "route_norm", "route_scale"}`,
and `build_model` puts a `TrainerRouter` in place of each `mlp.gate` (same weight, same outputs, plus the bias as
`mlp.gate.e_score_correction_bias`, the name DeepSeek-V3 checkpoints give theirs). Such a model evaluates exactly
in memory (loss, harness, scans, watcher, FSDP); `mode=convert` refuses it, since stock transformers would load its
HF dir with another routing.

Imports nothing of `ckpteval` but `errors` (a leaf, like `_common`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FLAG = "ckpteval_router"
# transformers model types whose `mlp.gate` is a top-k router (weight [E, H]; forward -> logits, weights, indices)
# that `TrainerRouter` stands in for
ROUTER_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3")


class TrainerRouter(nn.Module):
    """torchtitan's `TokenChoiceTopKRouter` (no node-limited groups): softmax or sigmoid scores, experts chosen on
    scores + `e_score_correction_bias`, weights = the chosen scores, divided by their sum (+1e-20) when
    `route_norm`, times `route_scale`. Drop-in for a transformers top-k router."""

    not_in_transformers = ("its router (softmax scores with an aux-loss-free expert bias that changes the choice) "
                           "is computed by no transformers class")

    def __init__(self, router: nn.Module, score_func: str, route_norm: bool, route_scale: float):
        super().__init__()
        self.top_k, self.num_experts, self.hidden_dim = router.top_k, router.num_experts, router.hidden_dim
        self.score_func, self.route_norm, self.route_scale = score_func, route_norm, route_scale
        self.weight = router.weight
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32,
                                                                    device=router.weight.device))

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        logits = router_logits.float()
        scores = F.softmax(logits, dim=-1) if self.score_func == "softmax" else torch.sigmoid(logits)
        _, indices = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1)
        weights = scores.gather(-1, indices)
        if self.route_norm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, (weights * self.route_scale).to(router_logits.dtype), indices


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
    """Replace each top-k `mlp.gate` by a `TrainerRouter` when the config asks for it (in place)."""
    spec = getattr(model.config, CONFIG_FLAG, None)
    if not spec:
        return model
    replaced = 0
    for name, module in list(model.named_modules()):
        gate = getattr(module, "gate", None)
        if name.endswith(".mlp") and gate is not None and hasattr(gate, "top_k") and hasattr(gate, "weight"):
            module.gate = TrainerRouter(gate, spec["score_func"], bool(spec["route_norm"]),
                                        float(spec["route_scale"]))
            replaced += 1
    if not replaced:  # transformers 4's MoE blocks route inside the block (`gate` is a plain Linear)
        from ckpteval.errors import CkptEvalError

        raise CkptEvalError(f"this checkpoint's router needs transformers' top-k router modules (transformers >= 5) "
                            f"to be computed exactly; {model.config.model_type} here has none: upgrade transformers")
    return model


def not_in_transformers(config) -> str | None:
    """Why stock transformers would compute another function than the model `config` builds here, None when it
    would not (a config, so that mode=convert refuses before anything is allocated)."""
    return TrainerRouter.not_in_transformers if getattr(config, CONFIG_FLAG, None) else None

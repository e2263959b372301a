"""Megatron-Core `dist_checkpointing` checkpoints (torch_dist backend): `iter_0000010/` dirs holding
`metadata.json`, `common.pt` (Megatron-LM's `args`, `iteration`, ...), DCP `.metadata` and `__*_*.distcp`.

Layout (what `GPTModel.sharded_state_dict()` writes), mapped onto transformers Llama:
- per-layer tensors stacked along a leading layer dim: `decoder.layers.self_attention.linear_qkv.weight [L, ...]`
  (older saves and some specs: `decoder.layers.{i}.…`; both are read);
- fused QKV per query group: rows `[ng, (q_per_group + 2) * head_dim]` = each group's queries, then its key, then
  its value;
- fused `linear_fc1` = gate | up (SwiGLU: `silu(first half) * second half`);
- the norms fused into the next linear (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`, what both
  the Transformer-Engine and the local specs save), or separate `input_layernorm` / `pre_mlp_layernorm`;
- `_extra_state` entries (TE's FP8 metadata) and optimizer state are never read.

Megatron's RoPE rotates halves (like transformers) unless `rotary_interleaved`, where q/k rows are permuted.
Architecture from Megatron-LM's `args` in common.pt, else config.json in or beside the dir, else the `model` group;
the tensors are checked against it (a contradiction names both).

Mixture of experts (`--num-experts`): the router `mlp.router.weight [L, E, H]` (and, with
`moe_router_enable_expert_bias`, its `expert_bias [L, E]`), SequentialMLP experts saved with a global expert axis
`mlp.experts.experts.linear_fc1.weight [L, E, 2F, H]` / `linear_fc2 [L, E, H, F]` (the layout every
expert-parallel degree writes: ranks hold slices of that axis), shared experts `mlp.shared_experts.linear_fc1/2`
(+ `gate_weight` with `moe_shared_expert_gate`). Each router kind maps onto the one transformers class that
computes it exactly (`moe_config_from_args`); the tensors are returned in that class's hub layout (experts split
per expert) and transformers fuses them on load:
- softmax over the top-k logits (`moe_router_pre_softmax=False`, the default) = softmax, top-k, renormalise:
  Mixtral (`block_sparse_moe.*`); with `qk_layernorm`: Qwen3-MoE (`norm_topk_prob=True`);
- softmax before the top-k (`moe_router_pre_softmax=True`, no renormalisation): Qwen3-MoE with `qk_layernorm`, or
  Qwen2-MoE with a gated shared expert (`norm_topk_prob=False`);
- a gated shared expert (`moe_shared_expert_gate`, sigmoid gate): Qwen2-MoE (`shared_expert`, `shared_expert_gate`);
- sigmoid scores (optionally with the aux-loss-free `expert_bias`, renormalised over the top k, scaled by
  `moe_router_topk_scaling_factor`) and an ungated shared expert: GLM-4-MoE (`e_score_correction_bias`,
  `shared_experts`, full rotary).
Refused in one line each (never a silently different routing): a capacity factor (Megatron drops tokens over
capacity at evaluation too), router input jitter (random at evaluation too), sinkhorn routing, group-limited routing,
a forced load balancing, dense layers mixed in (`moe_layer_freq`), and combinations no class computes.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch

from ckpteval.checkpoint.formats._common import check_shapes, one_line, rope_pairs_to_halves
from ckpteval.checkpoint.formats._dcp import read_dcp_metadata, read_dcp_tensors
from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError

ITER_DIR = re.compile(r"^iter_(\d+)$")
LATEST = "latest_checkpointed_iteration.txt"
EMB, FINAL_NORM, OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"
# per-layer suffix -> HF role; alternatives spell the same tensor in different layer specs
LAYER_TENSORS = {
    "qkv": ("self_attention.linear_qkv.weight",),
    "qkv_bias": ("self_attention.linear_qkv.bias",),
    "ln1": ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    "proj": ("self_attention.linear_proj.weight",),
    "ln2": ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    "fc1": ("mlp.linear_fc1.weight",),
    "fc2": ("mlp.linear_fc2.weight",),
}
MOE_TENSORS = {
    "router": ("mlp.router.weight",),
    "expert_bias": ("mlp.router.expert_bias",),
    "experts_fc1": ("mlp.experts.experts.linear_fc1.weight",),  # [E, 2F, H] per layer: gate rows, then up rows
    "experts_fc2": ("mlp.experts.experts.linear_fc2.weight",),  # [E, H, F]
    "shared_fc1": ("mlp.shared_experts.linear_fc1.weight",),
    "shared_fc2": ("mlp.shared_experts.linear_fc2.weight",),
    "shared_gate": ("mlp.shared_experts.gate_weight",),
    "q_norm": ("self_attention.q_layernorm.weight",),
    "k_norm": ("self_attention.k_layernorm.weight",),
}
LAYER_TENSORS.update(MOE_TENSORS)
OPTIONAL = {"qkv_bias", *MOE_TENSORS}
DENSE_ONLY = {"fc1", "fc2"}
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def read_common(path: Path) -> dict:
    """common.pt through the allow-listed loader: argparse.Namespace (Megatron-LM's args) and Megatron's own
    classes become inert stand-ins; anything else (os.system, ...) is refused before anything is called."""
    from ckpteval.checkpoint.safe_pickle import torch_load

    f = path / "common.pt"
    if not f.is_file():
        return {}
    data = torch_load(f, extra_globals=[(argparse.Namespace, "argparse.Namespace")], inert=("megatron.", "numpy."))
    return data if isinstance(data, dict) else {}


def _args(common: dict) -> dict:
    args = common.get("args")
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else {}


def _base_fields(a: dict, vocab: int) -> dict:
    """The transformers fields every Megatron GPT maps onto (attention, norms, RoPE, embeddings); refuses what no
    Llama-like decoder computes."""
    unsupported = [f"{k}={a.get(k)}" for k, ok in (
        ("swiglu", a.get("swiglu") is True), ("normalization", a.get("normalization", "LayerNorm") == "RMSNorm"),
        ("position_embedding_type", a.get("position_embedding_type") == "rope"),
        ("rotary_percent", float(a.get("rotary_percent", 1.0)) == 1.0),
        ("apply_layernorm_1p", not a.get("apply_layernorm_1p")), ("add_bias_linear", not a.get("add_bias_linear")),
        ("multi_latent_attention", not a.get("multi_latent_attention"))) if not ok]
    if unsupported:
        raise CkptEvalError(f"Megatron args describe a model with {', '.join(unsupported)}: only Llama-style models "
                            "(swiglu, RMSNorm, full rotary, no linear biases) map onto transformers here; "
                            "convert it with Megatron's own HF exporter, or put a config.json beside the checkpoint")
    heads = a["num_attention_heads"]
    rope = None
    if a.get("use_rope_scaling"):
        rope = {"rope_type": "llama3", "factor": float(a.get("rope_scaling_factor", 8.0)), "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    max_pos = int(a.get("max_position_embeddings") or a.get("seq_length") or 2048)
    return {
        "vocab_size": int(a.get("padded_vocab_size") or vocab), "hidden_size": a["hidden_size"],
        "num_hidden_layers": a["num_layers"], "num_attention_heads": heads,
        "num_key_value_heads": a.get("num_query_groups") if a.get("group_query_attention") else heads,
        "head_dim": a.get("kv_channels") or a["hidden_size"] // heads,
        "rms_norm_eps": float(a.get("norm_epsilon", 1e-5)), "rope_theta": float(a.get("rotary_base", 10000)),
        "rope_scaling": rope, "max_position_embeddings": max(max_pos, 8193 if rope else 0),
        "tie_word_embeddings": not a.get("untie_embeddings_and_output_weights", False)}


def config_from_args(a: dict, vocab: int):
    """A transformers config from Megatron-LM's arguments (its own names): Llama for a dense GPT, the MoE class
    that computes its router exactly for `--num-experts` (`moe_config_from_args`)."""
    from transformers import LlamaConfig

    base = _base_fields(a, vocab)
    if a.get("num_experts"):
        return moe_config_from_args(a, base)
    if a.get("qk_layernorm"):
        raise CkptEvalError("Megatron args describe a dense model with qk_layernorm, which transformers' Llama does "
                            "not compute: convert it with Megatron's own HF exporter")
    return LlamaConfig(**base, intermediate_size=a.get("ffn_hidden_size") or 4 * a["hidden_size"],
                       attention_bias=bool(a.get("add_qkv_bias")), mlp_bias=False,
                       architectures=["LlamaForCausalLM"])


def _moe_kind(a: dict) -> tuple[str | None, list[str]]:
    """(transformers model type, []) for the Megatron router and experts `a` describes, (None, reasons) when no
    transformers class computes them."""
    problems = []
    for key, why in (("moe_expert_capacity_factor", "drops tokens over capacity, at evaluation too"),
                     ("moe_input_jitter_eps", "multiplies router inputs by random noise, at evaluation too"),
                     ("moe_router_num_groups", "group-limited routing"),
                     ("moe_router_force_load_balancing", "forced load balancing"),
                     ("moe_apply_probs_on_input", "routing weights applied to expert inputs"),
                     ("moe_latent_size", "latent MoE projections")):
        if a.get(key):
            problems.append(f"{key}={a[key]} ({why})")
    balancing = a.get("moe_router_load_balancing_type", "aux_loss")
    if "sinkhorn" in (balancing if isinstance(balancing, list) else [balancing]):
        problems.append("moe_router_load_balancing_type=sinkhorn (routes through sinkhorn)")
    freq = a.get("moe_layer_freq", 1)
    if freq not in (1, None) and not (isinstance(freq, list) and all(f == 1 for f in freq)):
        problems.append(f"moe_layer_freq={freq} (dense layers between MoE layers)")
    score, pre = a.get("moe_router_score_function", "softmax"), bool(a.get("moe_router_pre_softmax"))
    shared, gated, qk_norm = a.get("moe_shared_expert_intermediate_size"), a.get("moe_shared_expert_gate"), \
        a.get("qk_layernorm")
    scaling = a.get("moe_router_topk_scaling_factor")
    if score == "sigmoid":
        if not shared or gated:
            problems.append("a sigmoid router without an ungated shared expert (GLM-4-MoE's sigmoid router comes with "
                            "one)")
        elif shared % int(a.get("moe_ffn_hidden_size") or a["ffn_hidden_size"]):
            problems.append(f"moe_shared_expert_intermediate_size={shared}, not a multiple of moe_ffn_hidden_size")
        kind = "glm4_moe"
    elif score != "softmax":
        problems.append(f"moe_router_score_function={score}")
        kind = None
    else:
        if scaling not in (None, 1, 1.0):
            problems.append(f"moe_router_topk_scaling_factor={scaling} with a softmax router")
        if shared and not gated:
            problems.append("an ungated shared expert with a softmax router (Qwen2-MoE gates it)")
        if shared and qk_norm:
            problems.append("a shared expert with qk_layernorm")
        kind = "qwen2_moe" if shared else "qwen3_moe" if qk_norm else "mixtral"
        if kind == "mixtral" and pre:
            problems.append("moe_router_pre_softmax=True without qk_layernorm or a shared expert (Mixtral "
                            "renormalises over the top k)")
    return (None, problems) if problems else (kind, [])


def moe_config_from_args(a: dict, base: dict):
    """Mixtral, Qwen2-MoE, Qwen3-MoE or GLM-4-MoE, whichever computes this router exactly (module docstring)."""
    import transformers

    kind, problems = _moe_kind(a)
    if kind is None:
        raise CkptEvalError(f"Megatron MoE router with {'; '.join(problems)}: no transformers class computes that, so "
                            "it would route differently: not supported")
    experts, top_k = int(a["num_experts"]), int(a.get("moe_router_topk", 2))
    hidden = int(a.get("moe_ffn_hidden_size") or a["ffn_hidden_size"])
    dense = int(a.get("ffn_hidden_size") or hidden)
    norm = not a.get("moe_router_pre_softmax")
    if kind == "mixtral":
        return transformers.MixtralConfig(**base, intermediate_size=hidden, num_local_experts=experts,
                                          num_experts_per_tok=top_k, architectures=["MixtralForCausalLM"])
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**base, intermediate_size=dense, moe_intermediate_size=hidden,
                                           num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=norm,
                                           attention_bias=False, architectures=["Qwen3MoeForCausalLM"])
    if kind == "qwen2_moe":
        shared = int(a["moe_shared_expert_intermediate_size"])
        return transformers.Qwen2MoeConfig(**base, intermediate_size=dense, moe_intermediate_size=hidden,
                                           num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=norm,
                                           shared_expert_intermediate_size=shared, qkv_bias=bool(a.get("add_qkv_bias")),
                                           architectures=["Qwen2MoeForCausalLM"])
    rope = {"rope_type": "default", "rope_theta": base.pop("rope_theta"), "partial_rotary_factor": 1.0}
    if base.pop("rope_scaling"):
        raise CkptEvalError("Megatron MoE with use_rope_scaling and a sigmoid router: not supported")
    return transformers.Glm4MoeConfig(
        **base, rope_parameters=rope, intermediate_size=dense, moe_intermediate_size=hidden, n_routed_experts=experts,
        num_experts_per_tok=top_k, n_shared_experts=int(a["moe_shared_expert_intermediate_size"]) // hidden,
        n_group=1, topk_group=1, norm_topk_prob=top_k > 1, first_k_dense_replace=0,
        routed_scaling_factor=float(a.get("moe_router_topk_scaling_factor") or 1.0),
        use_qk_norm=bool(a.get("qk_layernorm")), attention_bias=bool(a.get("add_qkv_bias")),
        architectures=["Glm4MoeForCausalLM"])


class MegatronFormat(CheckpointFormat):
    name = "megatron"
    description = ("a Megatron-Core dist_checkpointing dir (iter_NNNNNNN with metadata.json, common.pt, .metadata); "
                   "architecture from Megatron's args in common.pt, else config.json, else the model group")

    # ------------------------------------------------------------------ cheap questions

    def looks_like(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_dir() or not (path / "metadata.json").is_file():
            return False
        try:
            meta = json.loads((path / "metadata.json").read_text())
        except (OSError, ValueError):
            return bool(ITER_DIR.match(path.name))  # half-written: ours, and check_complete says so
        return isinstance(meta, dict) and "sharded_backend" in meta

    def check_complete(self, path: Path) -> None:
        path = Path(path)
        try:
            meta = json.loads((path / "metadata.json").read_text())
        except (OSError, ValueError):
            raise CkptEvalError(f"Megatron checkpoint {path} is incomplete: metadata.json is missing or unreadable "
                                "(still being written?)") from None
        if meta.get("sharded_backend") != "torch_dist":
            raise CkptEvalError(f"Megatron checkpoint {path} uses the {meta.get('sharded_backend')!r} backend: only "
                                "torch_dist is read (re-save with dist_ckpt_format=torch_dist)")
        if not (path / "common.pt").is_file():
            raise CkptEvalError(f"Megatron checkpoint {path} is incomplete: common.pt is missing")
        read_dcp_metadata(path)

    def step_tokens(self, path: Path) -> tuple[int | None, int | None]:
        path = Path(path)
        m = ITER_DIR.match(path.name)
        common = read_common(path)
        a = _args(common)
        step = int(m.group(1)) if m else _int(common.get("iteration"))
        if step is None and (path.parent / LATEST).is_file():
            text = (path.parent / LATEST).read_text().strip()
            step = int(text) if text.isdigit() else None
        samples, seq = _int(a.get("consumed_train_samples")), _int(a.get("seq_length"))
        return step, (samples * seq if samples and seq else None)

    # ------------------------------------------------------------------ tensors

    def _model_tensors(self, path: Path) -> dict[str, Any]:
        """{DCP key: TensorStorageMetadata} of the model tensors; an unknown model tensor is an error."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        known = {EMB, FINAL_NORM, OUTPUT} | {f"decoder.layers.{s}" for alts in LAYER_TENSORS.values() for s in alts}
        out = {}
        for key, meta in read_dcp_metadata(path).state_dict_metadata.items():
            if not key.startswith(MODEL_PREFIXES) or "_extra_state" in key or not isinstance(meta,
                                                                                            TensorStorageMetadata):
                continue
            if re.sub(r"^decoder\.layers\.\d+\.", "decoder.layers.", key) not in known:
                raise CkptEvalError(f"Megatron checkpoint {path} holds {key}, which has no transformers counterpart "
                                    "here (MLA, grouped-GEMM experts, biases, ...): convert it with Megatron's own "
                                    "exporter")
            out[key] = meta
        return out

    def _shapes_raw(self, path: Path) -> dict[str, tuple[int, ...]]:
        return {k: tuple(m.size) for k, m in self._model_tensors(path).items()}

    def _convert(self, raw: dict[str, torch.Tensor], config, path: Path,
                 interleaved: bool = False) -> dict[str, torch.Tensor]:
        """Megatron tensors -> HF checkpoint names and layouts of `config`'s class (works on meta tensors too:
        tensor_specs uses that)."""
        layers = config.num_hidden_layers
        heads, groups = config.num_attention_heads, config.num_key_value_heads
        hd = getattr(config, "head_dim", None) or config.hidden_size // heads
        state = {"model.embed_tokens.weight": raw[EMB], "model.norm.weight": raw[FINAL_NORM]}
        if OUTPUT in raw and not config.tie_word_embeddings:
            state["lm_head.weight"] = raw[OUTPUT]
        moe = any(k.startswith("decoder.layers.") and ".mlp.experts." in k for k in raw)
        for i in range(layers):
            t = {role: _layer(raw, role, i, path, optional=role in OPTIONAL or (moe and role in DENSE_ONLY))
                 for role in LAYER_TENSORS}
            p = f"model.layers.{i}."
            qkv = t["qkv"]
            want = groups * (heads // groups + 2) * hd
            if qkv.shape[0] != want:
                raise CkptEvalError(f"Megatron checkpoint {path}: linear_qkv has {qkv.shape[0]} rows but the "
                                    f"architecture ({heads} heads, {groups} query groups, head_dim {hd}) needs {want}")
            q, k, v = _split_qkv(qkv, groups, heads // groups, hd)
            if interleaved:
                q, k = rope_pairs_to_halves(q, heads), rope_pairs_to_halves(k, groups)
            state.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                          p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": t["proj"],
                          p + "input_layernorm.weight": t["ln1"], p + "post_attention_layernorm.weight": t["ln2"]})
            if t["qkv_bias"] is not None:
                qb, kb, vb = _split_qkv(t["qkv_bias"][:, None], groups, heads // groups, hd)
                state.update({p + "self_attn.q_proj.bias": qb[:, 0], p + "self_attn.k_proj.bias": kb[:, 0],
                              p + "self_attn.v_proj.bias": vb[:, 0]})
            for role, name in (("q_norm", "self_attn.q_norm.weight"), ("k_norm", "self_attn.k_norm.weight")):
                if t[role] is not None:
                    state[p + name] = t[role]
            if t["experts_fc1"] is not None:
                state.update(_moe_layer(t, p, config.model_type))
            else:
                gate, up = t["fc1"].chunk(2, dim=0)  # SwiGLU: silu(first half) * second half
                state.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                              p + "mlp.down_proj.weight": t["fc2"]})
        return state

    def _interleaved(self, path: Path) -> bool:
        return bool(_args(read_common(path)).get("rotary_interleaved"))

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        path = Path(path)
        raw_shapes = self._shapes_raw(path)

        def shapes_for(config) -> dict[str, tuple[int, ...]]:
            meta = {k: torch.empty(s, device="meta") for k, s in raw_shapes.items()}
            try:
                return {k: tuple(v.shape) for k, v in self._convert(meta, config, path).items()}
            except (RuntimeError, KeyError, IndexError) as exc:
                raise CkptEvalError(f"Megatron checkpoint {path} does not fit its architecture ({exc}): fix the "
                                    "config or put the right config.json beside the checkpoint") from None

        def from_args() -> Architecture | None:
            a = _args(read_common(path))
            if not a:
                return None
            source = f"Megatron args in {path / 'common.pt'}"
            try:
                return Architecture(config_from_args(a, raw_shapes[EMB][0]), source)
            except CkptEvalError:
                raise
            except Exception as e:  # noqa: BLE001 - args missing a field, transformers' strict config validation
                raise CkptEvalError(f"{source} do not describe a model transformers can build ({type(e).__name__}: "
                                    f"{one_line(e)}): put a transformers config.json beside the checkpoint") from None

        # Megatron's own args first (the brief's order for this family), then config.json, then the model group
        arch = from_args()
        if arch is not None:
            check_shapes(arch.config, shapes_for(arch.config), arch.source, path)
            return arch
        return self._arch_without_args(path, model_cfg, shapes_for)

    def _arch_without_args(self, path: Path, model_cfg, shapes_for) -> Architecture:
        from ckpteval.checkpoint.formats import _common

        cdir = _common.config_dir(path, path.parent)
        if cdir is not None:
            arch = _common.config_json_arch(cdir)
        else:
            arch = _common.model_group_arch(model_cfg, path, "Megatron", "no args in common.pt, no config.json in "
                                                                         "or beside it")
        check_shapes(arch.config, shapes_for(arch.config), arch.source, path)
        return arch

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]]:
        path = Path(path)
        meta = {k: torch.empty(s, device="meta") for k, s in self._shapes_raw(path).items()}
        return {k: tuple(v.shape) for k, v in self._convert(meta, config, path).items()}

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        path = Path(path)
        raw = read_dcp_tensors(path, self._model_tensors(path))
        return {k: v.contiguous() for k, v in self._convert(raw, config, path, self._interleaved(path)).items()}


def _layer(raw: dict[str, torch.Tensor], role: str, i: int, path: Path,
           optional: bool = False) -> torch.Tensor | None:
    """Layer i's tensor for `role`, from the stacked `[L, ...]` tensor or a per-layer key."""
    for suffix in LAYER_TENSORS[role]:
        if f"decoder.layers.{suffix}" in raw:
            return raw[f"decoder.layers.{suffix}"][i]
        if f"decoder.layers.{i}.{suffix}" in raw:
            return raw[f"decoder.layers.{i}.{suffix}"]
    if optional:
        return None
    raise CkptEvalError(f"Megatron checkpoint {path} has no decoder.layers.{LAYER_TENSORS[role][0]} for layer {i}")


def _moe_layer(t: dict, p: str, model_type: str) -> dict[str, torch.Tensor]:
    """One MoE layer's router, experts (split per expert: gate = the first half of each expert's fc1 rows, as
    Megatron's SwiGLU reads it) and shared expert, under `model_type`'s hub names."""
    from ckpteval.checkpoint.formats._moe import split_experts

    fc1 = t["experts_fc1"]  # [E, 2F, H]
    half = fc1.shape[1] // 2
    out = split_experts(p, model_type, fc1[:, :half], fc1[:, half:], t["experts_fc2"])
    out[p + ("block_sparse_moe.gate.weight" if model_type == "mixtral" else "mlp.gate.weight")] = t["router"]
    if t["expert_bias"] is not None:
        out[p + "mlp.gate.e_score_correction_bias"] = t["expert_bias"]
    elif model_type == "glm4_moe":  # a sigmoid router trained without the bias: GLM-4-MoE's, at zero
        out[p + "mlp.gate.e_score_correction_bias"] = torch.zeros(t["router"].shape[0], device=t["router"].device)
    if t["shared_fc1"] is not None:
        shared = p + ("mlp.shared_expert." if model_type == "qwen2_moe" else "mlp.shared_experts.")
        gate, up = t["shared_fc1"].chunk(2, dim=0)
        out.update({shared + "gate_proj.weight": gate, shared + "up_proj.weight": up,
                    shared + "down_proj.weight": t["shared_fc2"]})
    if t["shared_gate"] is not None:
        out[p + "mlp.shared_expert_gate.weight"] = t["shared_gate"]
    return out


def _split_qkv(w: torch.Tensor, groups: int, q_per_group: int, hd: int):
    """Fused QKV rows [ng, (q_per_group + 2) * head_dim] -> q [heads*hd], k [ng*hd], v [ng*hd] (rows)."""
    g = w.reshape(groups, q_per_group + 2, hd, w.shape[-1])
    q = g[:, :q_per_group].reshape(groups * q_per_group * hd, -1)
    return q, g[:, q_per_group].reshape(groups * hd, -1), g[:, q_per_group + 1].reshape(groups * hd, -1)


def _int(value) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

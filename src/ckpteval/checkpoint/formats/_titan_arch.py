"""transformers configs from torchtitan's model config (the dict its job config dump holds as `model_spec.model`,
or its registry's flavor): llama3 -> Llama, qwen3 -> Qwen3 / Qwen3-MoE, deepseek_v3 -> DeepSeek-V3.

Every MoE router detail torchtitan's `TokenChoiceTopKRouter` computes (score function, top-k, route_norm,
route_scale, node-limited groups, the aux-loss-free `expert_bias`, a token-dropping capacity factor) either has an
exact counterpart in the transformers class named here or is refused in one line naming it: never a silently
different routing. Sizes a config may leave to a formula (FFN width, vocab) come from the tensors themselves.
"""

from __future__ import annotations

from ckpteval.errors import CkptEvalError

# torchtitan model name -> the transformers classes its dense / MoE layers map onto
SUPPORTED = ("llama3", "qwen3", "deepseek_v3")


def config_from_titan(name: str, model: dict, shapes: dict[str, tuple[int, ...]], source: str):
    if "legacy_args" in model or name in ("llama3", "llama", "None"):
        return llama_config(model, shapes)
    if name == "qwen3":
        return qwen3_config(model, shapes, source)
    if name == "deepseek_v3":
        return deepseek_v3_config(model, shapes, source)
    raise CkptEvalError(f"{source} describes a torchtitan {name} model, which has no transformers mapping here "
                        f"(torchtitan models read: {', '.join(SUPPORTED)}): export it with torchtitan's own "
                        "state-dict adapter and put a transformers config.json beside it")


def _rope(rcfg: dict, source: str, allow_llama_scaling: bool = True) -> tuple[float, int, dict]:
    theta, max_pos, rope = rcfg.get("theta", 10000.0), rcfg.get("max_seq_len", 2048), {}
    scaling = rcfg.get("scaling", "none")
    if scaling == "llama" and allow_llama_scaling:
        rope = {"rope_type": "llama3", "factor": rcfg["scaling_factor"], "low_freq_factor": rcfg["low_freq_factor"],
                "high_freq_factor": rcfg["high_freq_factor"],
                "original_max_position_embeddings": rcfg["original_max_position_embeddings"]}
    elif scaling != "none":
        raise CkptEvalError(f"torchtitan RoPE scaling {scaling!r} ({source}) has no transformers equivalent here: "
                            "convert the checkpoint with torchtitan's own HF export and put a config.json beside it")
    return float(theta), int(max_pos), rope


def llama_config(model: dict, shapes: dict[str, tuple[int, ...]]):
    """A transformers LlamaConfig from torchtitan's llama3 config (>= 0.3 dict, or < 0.3 TransformerModelArgs)."""
    from transformers import LlamaConfig

    if "legacy_args" in model:
        a = model["legacy_args"]
        dim, n_layers, n_heads = a["dim"], a["n_layers"], a["n_heads"]
        n_kv, eps, theta = a.get("n_kv_heads") or n_heads, a.get("norm_eps", 1e-5), a.get("rope_theta", 10000.0)
        head_dim, tied, rope = dim // n_heads, bool(a.get("enable_weight_tying", False)), {}
        if a.get("use_scaled_rope"):
            rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
        max_pos = a.get("max_seq_len", 2048)
    else:
        layer = model["layers"][0]
        attn = layer["attention"]
        dim, n_layers, n_heads = model["dim"], len(model["layers"]), attn["n_heads"]
        n_kv = attn.get("n_kv_heads") or n_heads
        head_dim = attn.get("head_dim") or (attn.get("qkv_linear") or {}).get("head_dim") or dim // n_heads
        eps, tied = layer["attention_norm"].get("eps", 1e-5), bool(model.get("enable_weight_tying", False))
        theta, max_pos, rope = _rope(attn.get("rope") or {}, "llama3")
    vocab = shapes.get("model.embed_tokens.weight", (model.get("vocab_size") or 0,))[0]
    ffn = shapes.get("model.layers.0.mlp.gate_proj.weight", (None,))[0]
    return LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=n_layers,
                       num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
                       rms_norm_eps=eps, rope_theta=float(theta), rope_scaling=rope or None,
                       max_position_embeddings=max(max_pos, rope.get("original_max_position_embeddings", 0) + 1),
                       tie_word_embeddings=tied, attention_bias=False, mlp_bias=False,
                       architectures=["LlamaForCausalLM"])


# ---------------------------------------------------------------------------------------------- MoE


def moe_fields(model: dict, source: str) -> dict | None:
    """The MoE settings of torchtitan's layers (None for a dense model): which layers are MoE, and the router and
    experts every MoE layer shares (a model whose MoE layers differ is refused)."""
    layers = model["layers"]
    moe_ids = [i for i, layer in enumerate(layers) if layer.get("moe")]
    if not moe_ids:
        return None
    settings = []
    for i in moe_ids:
        moe = layers[i]["moe"]
        router, routed = moe["router"], moe["routed_experts"]
        dispatcher = routed.get("token_dispatcher") or {}
        shared = moe.get("shared_experts")
        settings.append({
            "num_experts": int(moe["num_experts"]), "top_k": int(router["top_k"]),
            "score_func": router.get("score_func", "sigmoid"), "route_norm": bool(router.get("route_norm", False)),
            "route_scale": float(router.get("route_scale", 1.0)), "groups": router.get("num_expert_groups"),
            "limited_groups": router.get("num_limited_groups"), "gate_bias": bool((router.get("gate") or {}).get(
                "bias", False)), "hidden": int(routed["inner_experts"]["hidden_dim"]),
            "capacity_factor": dispatcher.get("non_blocking_capacity_factor"),
            "force_balance": bool(router.get("_debug_force_load_balance", False)),
            "shared_hidden": int(shared["w1"]["out_features"]) if shared else 0,
            "shared_gate": bool(shared and shared.get("gate")),
            "expert_bias": moe.get("load_balance_coeff") is not None})
    if any(s != settings[0] for s in settings):
        raise CkptEvalError(f"{source}: the MoE layers of this torchtitan model differ in their router or experts; "
                            "one transformers config describes one MoE layer kind: not supported")
    dense = [i for i in range(len(layers)) if i not in moe_ids]
    return {**settings[0], "moe_layers": moe_ids, "dense_layers": dense}


def _refuse(source: str, target: str, problems: list[str]) -> None:
    if problems:
        raise CkptEvalError(f"torchtitan MoE router ({source}) with {', '.join(problems)}: transformers' {target} "
                            "does not compute that, so it would route differently: not supported")


def _common_problems(m: dict) -> list[str]:
    out = []
    if m["capacity_factor"] is not None:
        out.append(f"non_blocking_capacity_factor={m['capacity_factor']} (drops tokens over capacity)")
    if m["force_balance"]:
        out.append("_debug_force_load_balance=True (round-robin routing)")
    if m["gate_bias"]:
        out.append("a bias on the router gate")
    return out


def qwen3_config(model: dict, shapes: dict[str, tuple[int, ...]], source: str):
    """Qwen3 (dense) or Qwen3-MoE: GQA with per-head q/k RMSNorm, half-split RoPE (torchtitan's CosSinRoPE, so no
    row permutation), softmax router renormalised over the top k when route_norm."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    layer = model["layers"][0]
    attn = layer["attention"]
    n_heads = attn["n_heads"]
    head_dim = attn.get("head_dim") or (attn.get("qkv_linear") or {}).get("head_dim") or model["dim"] // n_heads
    theta, max_pos, _ = _rope(attn.get("rope") or {}, source, allow_llama_scaling=False)
    common = {
        "vocab_size": shapes.get("model.embed_tokens.weight", (model.get("vocab_size") or 0,))[0],
        "hidden_size": model["dim"], "num_hidden_layers": len(model["layers"]), "num_attention_heads": n_heads,
        "num_key_value_heads": attn.get("n_kv_heads") or n_heads, "head_dim": head_dim,
        "rms_norm_eps": layer["attention_norm"].get("eps", 1e-6), "rope_theta": theta,
        "max_position_embeddings": max_pos, "tie_word_embeddings": bool(model.get("enable_weight_tying", False)),
        "attention_bias": False}
    moe = moe_fields(model, source)
    if moe is None:
        ffn = shapes.get("model.layers.0.mlp.gate_proj.weight", (None,))[0]
        return Qwen3Config(**common, intermediate_size=ffn, architectures=["Qwen3ForCausalLM"])
    problems = _common_problems(moe)
    if moe["score_func"] != "softmax":
        problems.append(f"score_func={moe['score_func']}")
    if moe["route_scale"] != 1.0:
        problems.append(f"route_scale={moe['route_scale']}")
    if moe["groups"]:
        problems.append(f"num_expert_groups={moe['groups']} (node-limited routing)")
    if moe["shared_hidden"]:
        problems.append("shared experts")
    _refuse(source, "Qwen3-MoE (softmax, top-k, optional renormalisation)", problems)
    dense = moe["dense_layers"]
    ffn = shapes.get(f"model.layers.{dense[0]}.mlp.gate_proj.weight", (moe["hidden"],))[0] if dense else moe["hidden"]
    return Qwen3MoeConfig(**common, intermediate_size=ffn, moe_intermediate_size=moe["hidden"],
                          num_experts=moe["num_experts"], num_experts_per_tok=moe["top_k"],
                          norm_topk_prob=moe["route_norm"], decoder_sparse_step=1, mlp_only_layers=dense,
                          architectures=["Qwen3MoeForCausalLM"])


def deepseek_v3_config(model: dict, shapes: dict[str, tuple[int, ...]], source: str):
    """DeepSeek-V3: MLA (q LoRA or not, interleaved RoPE on the rotary part: `rope_interleave`), yarn RoPE with
    torchtitan's softmax-scale mscale (`mscale` = `mscale_all_dim`, so transformers scales the softmax by the same
    mscale^2 and leaves cos/sin alone, as torchtitan does), the first `first_k_dense_replace` layers dense, shared
    experts. Its sigmoid router (node-limited groups by top-2 sums, `expert_bias`, route_norm with +1e-20,
    route_scale) is transformers' own; torchtitan's softmax recipe (debugmodel, 16B) is computed by
    `_moe.TrainerRouter` on the same model (no transformers DeepSeek class scores with softmax and a bias)."""
    from transformers import DeepseekV3Config

    from ckpteval.checkpoint.formats._moe import CONFIG_FLAG

    layers = model["layers"]
    attn = layers[0]["attention"]
    moe = moe_fields(model, source)
    if moe is None:
        raise CkptEvalError(f"{source}: a deepseek_v3 model without MoE layers is not mapped here: not supported")
    dense = moe["dense_layers"]
    if dense != list(range(len(dense))):
        raise CkptEvalError(f"{source}: dense layers {dense} are not the first ones (transformers' DeepSeek-V3 has "
                            "first_k_dense_replace): not supported")
    problems = _common_problems(moe)
    if moe["shared_gate"]:
        problems.append("a gated shared expert")
    if moe["shared_hidden"] % moe["hidden"]:
        problems.append(f"shared experts of width {moe['shared_hidden']}, not a multiple of {moe['hidden']}")
    if moe["score_func"] == "softmax" and moe["groups"]:
        problems.append("softmax scores with node-limited groups")
    if moe["groups"] and moe["num_experts"] // moe["groups"] < 2:
        problems.append("groups of fewer than 2 experts")
    _refuse(source, "DeepSeek-V3", problems)
    rcfg = attn.get("rope") or {}
    rope = {"rope_type": "default", "rope_theta": float(rcfg.get("theta", 10000.0))}
    if rcfg.get("scaling", "none") == "yarn" and float(rcfg.get("rope_factor", 1.0)) > 1.0:
        mscale = float(attn.get("mscale", 1.0))
        rope = {"rope_type": "yarn", "rope_theta": rope["rope_theta"], "factor": float(rcfg["rope_factor"]),
                "beta_fast": float(rcfg.get("beta_fast", 32.0)), "beta_slow": float(rcfg.get("beta_slow", 1.0)),
                "original_max_position_embeddings": int(rcfg.get("original_seq_len", 4096)),
                "mscale": mscale, "mscale_all_dim": mscale, "truncate": bool(rcfg.get("truncate", True))}
    elif rcfg.get("scaling", "none") not in ("none", "yarn"):
        raise CkptEvalError(f"torchtitan RoPE scaling {rcfg['scaling']!r} ({source}) is not mapped for deepseek_v3")
    q_lora = int(attn.get("q_lora_rank") or 0)
    ffn = shapes.get(f"model.layers.{dense[0]}.mlp.gate_proj.weight", (moe["hidden"],))[0] if dense else moe["hidden"]
    config = DeepseekV3Config(
        vocab_size=shapes.get("model.embed_tokens.weight", (model.get("vocab_size") or 0,))[0],
        hidden_size=model["dim"], intermediate_size=ffn, moe_intermediate_size=moe["hidden"],
        num_hidden_layers=len(layers), num_attention_heads=attn["n_heads"], num_key_value_heads=attn["n_heads"],
        n_shared_experts=moe["shared_hidden"] // moe["hidden"], n_routed_experts=moe["num_experts"],
        routed_scaling_factor=moe["route_scale"], kv_lora_rank=int(attn["kv_lora_rank"]),
        q_lora_rank=q_lora or None, qk_rope_head_dim=int(attn["qk_rope_head_dim"]),
        v_head_dim=int(attn["v_head_dim"]), qk_nope_head_dim=int(attn["qk_nope_head_dim"]),
        n_group=int(moe["groups"] or 1), topk_group=int(moe["limited_groups"] or 1),
        num_experts_per_tok=moe["top_k"], first_k_dense_replace=len(dense), norm_topk_prob=moe["route_norm"],
        rms_norm_eps=float(layers[0]["attention_norm"].get("eps", 1e-6)),
        max_position_embeddings=int(rcfg.get("max_seq_len", 4096)), rope_parameters=rope, rope_interleave=True,
        tie_word_embeddings=bool(model.get("enable_weight_tying", False)), attention_bias=False,
        architectures=["DeepseekV3ForCausalLM"])
    if moe["score_func"] == "softmax":
        setattr(config, CONFIG_FLAG, {"score_func": "softmax", "route_norm": moe["route_norm"],
                                      "route_scale": moe["route_scale"]})
    return config

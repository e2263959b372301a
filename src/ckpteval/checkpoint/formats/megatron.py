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
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch

from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.checkpoint.formats._common import check_shapes, rope_pairs_to_halves
from ckpteval.checkpoint.formats._dcp import read_dcp_metadata, read_dcp_tensors
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
OPTIONAL = {"qkv_bias"}
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


class _Opaque:
    """Stand-in for Megatron's own classes inside `args` (enums such as ModelType): takes the pickled values and
    runs nothing, so common.pt is read without importing Megatron or calling anything from the file."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def read_common(path: Path) -> dict:
    """common.pt through the allow-listed loader: argparse.Namespace (Megatron-LM's args) and Megatron's own
    classes become inert stand-ins; anything else (os.system, ...) is refused before anything is called."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    from ckpteval.checkpoint.safe_pickle import torch_load

    f = path / "common.pt"
    if not f.is_file():
        return {}
    try:
        asked = get_unsafe_globals_in_checkpoint(str(f))
    except Exception:  # noqa: BLE001 - unreadable: torch_load below says so in one line
        asked = []
    extra = [(argparse.Namespace, "argparse.Namespace")]
    extra += [(_Opaque, name) for name in asked if name.startswith("megatron.")]
    data = torch_load(f, extra_globals=extra)
    return data if isinstance(data, dict) else {}


def _args(common: dict) -> dict:
    args = common.get("args")
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else {}


def llama_config_from_args(a: dict, vocab: int):
    """A transformers LlamaConfig from Megatron-LM's arguments (its own names)."""
    from transformers import LlamaConfig

    unsupported = [f"{k}={a.get(k)}" for k, ok in (
        ("swiglu", a.get("swiglu") is True), ("normalization", a.get("normalization", "LayerNorm") == "RMSNorm"),
        ("position_embedding_type", a.get("position_embedding_type") == "rope"),
        ("rotary_percent", float(a.get("rotary_percent", 1.0)) == 1.0),
        ("apply_layernorm_1p", not a.get("apply_layernorm_1p")), ("add_bias_linear", not a.get("add_bias_linear")),
        ("num_experts", not a.get("num_experts"))) if not ok]
    if unsupported:
        raise CkptEvalError(f"Megatron args describe a model with {', '.join(unsupported)}: only Llama-style models "
                            "(swiglu, RMSNorm, full rotary, no linear biases, dense) map onto transformers here; "
                            "convert it with Megatron's own HF exporter, or put a config.json beside the checkpoint")
    heads = a["num_attention_heads"]
    rope = None
    if a.get("use_rope_scaling"):
        rope = {"rope_type": "llama3", "factor": float(a.get("rope_scaling_factor", 8.0)), "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    max_pos = int(a.get("max_position_embeddings") or a.get("seq_length") or 2048)
    return LlamaConfig(
        vocab_size=int(a.get("padded_vocab_size") or vocab), hidden_size=a["hidden_size"],
        intermediate_size=a.get("ffn_hidden_size") or 4 * a["hidden_size"], num_hidden_layers=a["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=a.get("num_query_groups") if a.get("group_query_attention") else heads,
        head_dim=a.get("kv_channels") or a["hidden_size"] // heads, rms_norm_eps=float(a.get("norm_epsilon", 1e-5)),
        rope_theta=float(a.get("rotary_base", 10000)), rope_scaling=rope,
        max_position_embeddings=max(max_pos, 8193 if rope else 0),
        tie_word_embeddings=not a.get("untie_embeddings_and_output_weights", False),
        attention_bias=bool(a.get("add_qkv_bias")), mlp_bias=False, architectures=["LlamaForCausalLM"])


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
                raise CkptEvalError(f"Megatron checkpoint {path} holds {key}, which has no transformers Llama "
                                    "counterpart here (MoE, MLA, biases, ...): convert it with Megatron's own exporter")
            out[key] = meta
        return out

    def _shapes_raw(self, path: Path) -> dict[str, tuple[int, ...]]:
        return {k: tuple(m.size) for k, m in self._model_tensors(path).items()}

    def _convert(self, raw: dict[str, torch.Tensor], config, path: Path,
                 interleaved: bool = False) -> dict[str, torch.Tensor]:
        """Megatron tensors -> HF Llama names and layouts (works on meta tensors too: tensor_specs uses that)."""
        layers = config.num_hidden_layers
        heads, groups = config.num_attention_heads, config.num_key_value_heads
        hd = getattr(config, "head_dim", None) or config.hidden_size // heads
        state = {"model.embed_tokens.weight": raw[EMB], "model.norm.weight": raw[FINAL_NORM]}
        if OUTPUT in raw and not config.tie_word_embeddings:
            state["lm_head.weight"] = raw[OUTPUT]
        for i in range(layers):
            t = {role: _layer(raw, role, i, path) for role in LAYER_TENSORS}
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
                          p + "input_layernorm.weight": t["ln1"], p + "post_attention_layernorm.weight": t["ln2"],
                          p + "mlp.down_proj.weight": t["fc2"]})
            if t["qkv_bias"] is not None:
                qb, kb, vb = _split_qkv(t["qkv_bias"][:, None], groups, heads // groups, hd)
                state.update({p + "self_attn.q_proj.bias": qb[:, 0], p + "self_attn.k_proj.bias": kb[:, 0],
                              p + "self_attn.v_proj.bias": vb[:, 0]})
            gate, up = t["fc1"].chunk(2, dim=0)  # SwiGLU: silu(first half) * second half
            state.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up})
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
            return Architecture(llama_config_from_args(a, raw_shapes[EMB][0]), f"Megatron args in {path / 'common.pt'}")

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


def _layer(raw: dict[str, torch.Tensor], role: str, i: int, path: Path) -> torch.Tensor | None:
    """Layer i's tensor for `role`, from the stacked `[L, ...]` tensor or a per-layer key."""
    for suffix in LAYER_TENSORS[role]:
        if f"decoder.layers.{suffix}" in raw:
            return raw[f"decoder.layers.{suffix}"][i]
        if f"decoder.layers.{i}.{suffix}" in raw:
            return raw[f"decoder.layers.{i}.{suffix}"]
    if role in OPTIONAL:
        return None
    raise CkptEvalError(f"Megatron checkpoint {path} has no decoder.layers.{LAYER_TENSORS[role][0]} for layer {i}")


def _split_qkv(w: torch.Tensor, groups: int, q_per_group: int, hd: int):
    """Fused QKV rows [ng, (q_per_group + 2) * head_dim] -> q [heads*hd], k [ng*hd], v [ng*hd] (rows)."""
    g = w.reshape(groups, q_per_group + 2, hd, w.shape[-1])
    q = g[:, :q_per_group].reshape(groups * q_per_group * hd, -1)
    return q, g[:, q_per_group].reshape(groups * hd, -1), g[:, q_per_group + 1].reshape(groups * hd, -1)


def _int(value) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

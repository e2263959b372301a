"""OLMo-core checkpoints: the `stepN/` dirs its Trainer's checkpointer writes (a DCP `model_and_optim/` dir).

    ckpt=runs/olmo2-tiny/step1000                 # or .../step1000/model_and_optim
    python run.py -m mode=loss 'ckpt=glob:runs/olmo2-tiny/step*'

A step dir holds `model_and_optim/` (DCP: `.metadata` + `__R_T.distcp`, the model under `model.`, the
optimizer under `optim.`), `train/rankN.pt` (trainer state), `.metadata.json` (written last: the checkpoint is
complete when it is there) and, from the `ConfigSaverCallback` every OLMo-core launch script attaches, the run's
`config.json` ({"model": TransformerConfig, "dataset", "train_module", "trainer", ...}). Only `model.*` tensors
are read; the optimizer state in the same files is never touched. OLMo-core's DCP writer pickles its own
`_StorageInfo` (plain data) into `.metadata`; the allow-listed unpickler builds torch's own `_StorageInfo` in its
place (`safe_pickle.DCP_METADATA_ALIASES`), so no OLMo-core code is imported or run.

Architecture: the run's config.json in the step dir or the save folder above it, its `model` section read as plain
JSON and mapped the way OLMo-core's own HF conversion does (`olmo_core.nn.hf`; read, not imported):
- `reordered_norm` blocks (OLMo 2: norms after attention and feed-forward, QK-norm over all heads) ->
  Olmo2ForCausalLM, or Olmo3ForCausalLM when some layers use sliding-window attention;
- `default` blocks (pre-norm, no QK-norm) -> LlamaForCausalLM;
- `complex` RoPE (rotation of adjacent pairs) is permuted to transformers' half-split layout
  (`rope_pairs_to_halves`); `default` RoPE already rotates halves.
Everything else (MoE, nGPT, gated attention, attention sinks, clip_qkv, partial rotary, RoPE scaling, per-head
QK-norm, embedding norms or scales, biases, block overrides, ...) is refused by name. Without that config.json a
transformers config.json beside the checkpoint, else the `model` group, is the source (checked against the
tensors). Step: the dir name (`step1000`); tokens seen: `global_train_tokens_seen` in `train/rank0.pt`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from ckpteval.checkpoint.formats import _common
from ckpteval.checkpoint.formats._dcp import read_dcp_metadata, read_dcp_tensors
from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step(\d+)$")
TRAIN_MODULE_DIR, DONE_FILE, TRAIN_STATE = "model_and_optim", ".metadata.json", "train/rank0.pt"
_BLOCK = r"blocks\.(\d+)\."
TOP_MAP = {"embeddings.weight": "model.embed_tokens.weight", "lm_head.norm.weight": "model.norm.weight",
           "lm_head.w_out.weight": "lm_head.weight"}
LAYER_MAP = {"attention.w_q.weight": "self_attn.q_proj.weight", "attention.w_k.weight": "self_attn.k_proj.weight",
             "attention.w_v.weight": "self_attn.v_proj.weight", "attention.w_out.weight": "self_attn.o_proj.weight",
             "attention.q_norm.weight": "self_attn.q_norm.weight", "attention.k_norm.weight": "self_attn.k_norm.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
             "feed_forward.w3.weight": "mlp.up_proj.weight"}
# where each block's two norms go: OLMo 2 normalises sublayer outputs, Llama sublayer inputs (olmo_core.nn.hf's map)
NORMS = {"reordered_norm": {"attention_norm.weight": "post_attention_layernorm.weight",
                            "feed_forward_norm.weight": "post_feedforward_layernorm.weight"},
         "default": {"attention_norm.weight": "input_layernorm.weight",
                     "feed_forward_norm.weight": "post_attention_layernorm.weight"}}
RMS_NORMS = ("rms", "fused_rms", "cute_rms")  # the same float32 formula (x * rsqrt(mean(x^2) + eps) * weight)

# ---------------------------------------------------------------------------------------------- paths


def step_dir(path: Path) -> Path:
    return path.parent if path.name == TRAIN_MODULE_DIR else path


def dcp_dir(path: Path) -> Path:
    """The DCP dir: the step dir's model_and_optim/, or the path itself (a bare model-only DCP save)."""
    return path / TRAIN_MODULE_DIR if (path / TRAIN_MODULE_DIR).is_dir() else path


def _model_prefix(keys) -> str | None:
    """"model." (a train module's {"model", "optim"} save) or "" (a model-only save) when the DCP keys are
    OLMo-core Transformer names (`embeddings.weight` + `blocks.N.`), else None."""
    keys = list(keys)
    for prefix in ("model.", ""):
        if prefix + "embeddings.weight" in keys and any(re.match(re.escape(prefix) + _BLOCK, k) for k in keys):
            return prefix
    return None


# ---------------------------------------------------------------------------------------------- run config


def find_run_config(path: Path) -> tuple[dict, Path] | None:
    """The run's config.json (ConfigSaverCallback's dump, or a bare TransformerConfig dump) in the step dir or the
    save folder: (its `model` section, the file), None when neither holds one."""
    d = step_dir(path)
    for cand in (d / "config.json", d.parent / "config.json"):
        data = _common.read_json(cand)
        model = data.get("model") if isinstance(data.get("model"), dict) else data
        if isinstance(model, dict) and "d_model" in model and "block" in model:
            return data, cand
    return None


class _Refusal(list):
    """Options found in the run config that have no transformers counterpart (one error names them all)."""

    def check(self, where: str, value, ok) -> None:
        if not (ok(value) if callable(ok) else value == ok):
            self.append(f"{where}={_short(value)}")


def _short(value) -> str:
    """A config value for an error line: dicts without OLMo-core's `_CLASS_` tags and unset fields."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items() if k != "_CLASS_" and v is not None) + "}"
    return repr(value)


def _norm_eps(cfg: dict | None, where: str, refuse: _Refusal) -> float | None:
    if cfg is None:
        return None
    refuse.check(f"{where}.name", cfg.get("name", "default"), lambda v: v in RMS_NORMS)
    refuse.check(f"{where}.elementwise_affine", cfg.get("elementwise_affine"), lambda v: v in (None, True))
    return float(cfg["eps"]) if cfg.get("eps") is not None else 1e-5  # olmo_core's LayerNorm default


def hf_config_from_run(data: dict, source: Path):
    """(transformers config, block name, RoPE name) from OLMo-core's run config; one error naming every option
    that has no transformers counterpart."""
    model = data.get("model") if isinstance(data.get("model"), dict) else data
    refuse = _Refusal()
    for key, neutral in (("name", "default"), ("embedding_norm", None), ("embed_scale", None),
                         ("block_pattern", None), ("block_overrides", None)):
        refuse.check(f"model.{key}", model.get(key, neutral), neutral)
    block = model["block"]
    if not isinstance(block, dict) or "name" not in block and "sequence_mixer" not in block and "attention" not in block:
        raise CkptEvalError(f"OLMo-core run config {source} has per-type blocks (model.block is a dict of block "
                            "configs), which have no transformers counterpart here: export the model with "
                            "OLMo-core's own convert_checkpoint_to_hf")
    name = block.get("name", "default")
    refuse.check("block.name", name, lambda v: v in NORMS)
    for key in ("feed_forward_moe", "attention_residual_alpha", "feed_forward_residual_alpha"):
        refuse.check(f"block.{key}", block.get(key), None)
    attn = block.get("sequence_mixer") or block.get("attention") or {}
    refuse.check("attention.type", attn.get("type", "attention"), "attention")
    refuse.check("attention.name", attn.get("name", "default"), "default")
    for key, neutral in (("gate", None), ("clip_qkv", None), ("softmax_scale", None), ("scalable_softmax", False),
                         ("attention_sinks", False), ("qk_norm_per_head_gains", None)):
        refuse.check(f"attention.{key}", attn.get(key, neutral), lambda v, n=neutral: v in (n, False, None))
    rope = attn.get("rope")
    refuse.check("attention.rope", rope, lambda v: isinstance(v, dict))
    rope = rope or {}
    refuse.check("rope.name", rope.get("name", "default"), lambda v: v in ("default", "complex"))
    refuse.check("rope.scaling", rope.get("scaling"), None)
    refuse.check("rope.partial_rotary_factor", rope.get("partial_rotary_factor", 1.0), 1.0)
    refuse.check("rope.no_global_rope", rope.get("no_global_rope", False), False)
    ff = block.get("feed_forward") or {}
    refuse.check("feed_forward.name", ff.get("name", "default"), "default")
    refuse.check("feed_forward.activation", ff.get("activation", "silu"), "silu")
    lm_head = model.get("lm_head") or {}
    refuse.check("lm_head.name", lm_head.get("name", "default"), "default")
    qk = attn.get("qk_norm")
    head_qk = bool(attn.get("use_head_qk_norm"))
    epses = {where: _norm_eps(cfg, where, refuse) for where, cfg in (
        ("block.layer_norm", block.get("layer_norm")), ("lm_head.layer_norm", lm_head.get("layer_norm")),
        ("attention.qk_norm", qk))}
    if epses["block.layer_norm"] is None or epses["lm_head.layer_norm"] is None:
        refuse.append("a block or final layer norm that is not set")
    if len({e for e in epses.values() if e is not None}) > 1:
        refuse.append("norm epsilons " + ", ".join(f"{k}={v}" for k, v in epses.items() if v is not None) +
                      " (transformers has one rms_norm_eps)")
    d_model, n_heads = int(model["d_model"]), int(attn.get("n_heads", 16))
    n_kv = int(attn.get("n_kv_heads") or n_heads)
    head_dim = int(attn.get("head_dim") or d_model // n_heads)
    windows = _layer_windows(attn.get("sliding_window"), int(model["n_layers"]))
    if name == "reordered_norm" and (qk is None or head_qk):
        refuse.append("reordered_norm blocks with " + ("per-head QK-norm (use_head_qk_norm)" if qk else "no QK-norm") +
                      " (OLMo 2 normalises q and k over all heads)")
    elif name == "default":
        refuse.check("attention.qk_norm (QK-norm in a pre-norm block)", qk, None)
        refuse.check("attention.sliding_window (sliding windows in a pre-norm block)", attn.get("sliding_window"),
                     None)
    if name == "reordered_norm" and head_dim * n_heads != d_model:
        refuse.append(f"attention.head_dim={head_dim} with d_model={d_model} and n_heads={n_heads} (OLMo 2 in "
                      "transformers derives head_dim)")
    if refuse:
        raise CkptEvalError(f"OLMo-core run config {source} describes a model with {', '.join(refuse)}, which has no "
                            "transformers counterpart here: export it with OLMo-core's own convert_checkpoint_to_hf "
                            "(then ckpt= the HF dir)")
    run = data if data is not model else {}
    max_len = (_common.int_or_none((run.get("train_module") or {}).get("max_sequence_length"))
               or _common.int_or_none((run.get("dataset") or {}).get("sequence_length")) or -1)  # -1: no limit
    common = {"vocab_size": int(model["vocab_size"]), "hidden_size": d_model,
              "intermediate_size": int(ff["hidden_size"]), "num_hidden_layers": int(model["n_layers"]),
              "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "hidden_act": "silu",
              "max_position_embeddings": max_len, "attention_bias": False, "rms_norm_eps": epses["block.layer_norm"],
              "rope_parameters": {"rope_type": "default", "rope_theta": float(rope.get("theta", 500_000))},
              "tie_word_embeddings": bool(model.get("tie_word_embeddings", False)), "pad_token_id": None,
              "bos_token_id": None, "eos_token_id": None}
    if name == "default":
        from transformers import LlamaConfig

        config = LlamaConfig(**common, head_dim=head_dim, mlp_bias=False, architectures=["LlamaForCausalLM"])
    elif any(w != -1 for w in windows):
        from transformers import Olmo3Config

        sizes = {w for w in windows if w != -1}
        if len(sizes) > 1:
            raise CkptEvalError(f"OLMo-core run config {source} uses sliding windows of several sizes {sorted(sizes)}: "
                                "transformers' Olmo3 has one sliding_window; export it with OLMo-core's own "
                                "convert_checkpoint_to_hf")
        # olmo_core's window W attends to the W positions up to and including the query (its HF export writes W).
        # Olmo3 keeps RoPE parameters per layer type; given one flat dict it fills the sliding layers with its own
        # default theta (500000), so both are spelled out.
        common["rope_parameters"] = {kind: dict(common["rope_parameters"]) for kind in ("full_attention",
                                                                                       "sliding_attention")}
        config = Olmo3Config(**common, sliding_window=sizes.pop(), architectures=["Olmo3ForCausalLM"],
                             layer_types=["full_attention" if w == -1 else "sliding_attention" for w in windows])
    else:
        from transformers import Olmo2Config

        config = Olmo2Config(**common, architectures=["Olmo2ForCausalLM"])
    return config, name, rope.get("name", "default")


def _layer_windows(cfg: dict | None, n_layers: int) -> list[int]:
    """Per layer: the sliding window size, -1 for full attention (SlidingWindowAttentionConfig's own rule)."""
    if not cfg:
        return [-1] * n_layers
    pattern = [int(w) for w in cfg["pattern"]]
    first, last = cfg.get("force_full_attention_on_first_layer", True), cfg.get("force_full_attention_on_last_layer",
                                                                                 True)
    out = []
    for i in range(n_layers):
        if (first and i == 0) or (last and i == n_layers - 1):
            out.append(-1)
        else:
            out.append(pattern[(i - 1 if first else i) % len(pattern)])
    return out


# ---------------------------------------------------------------------------------------------- tensors


def convert_state(raw: dict[str, torch.Tensor], block: str, rope: str, config, path: Path) -> dict[str, torch.Tensor]:
    """OLMo-core Transformer tensors (prefix removed) -> transformers names and layouts (meta tensors work too)."""
    norms = NORMS[block]
    out = {}
    for key, t in raw.items():
        if key in TOP_MAP:
            out[TOP_MAP[key]] = t
            continue
        m = re.match(_BLOCK + r"(.+)$", key)
        rest = m.group(2) if m else None
        hf = LAYER_MAP.get(rest) or norms.get(rest) if rest else None
        if hf is None:
            raise CkptEvalError(f"OLMo-core checkpoint {path} holds {key}, which has no place in the transformers "
                                f"{config.architectures[0]} its config maps to (biases, gates, MoE, ...): export it "
                                "with OLMo-core's own convert_checkpoint_to_hf")
        if rope == "complex" and hf in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = config.num_attention_heads if hf.startswith("self_attn.q") else config.num_key_value_heads
            t = _common.rope_pairs_to_halves(t, heads)
        out[f"model.layers.{m.group(1)}.{hf}"] = t
    if getattr(config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


def _layout_from_hf(config) -> tuple[str, str]:
    """(block, rope) for a transformers config.json source: OLMo 2/3 -> reordered norms, else pre-norm; RoPE as
    transformers lays it out (an OLMo-core run with complex RoPE needs its run config)."""
    return ("reordered_norm" if config.model_type in ("olmo2", "olmo3") else "default"), "default"


def read_train_state(path: Path) -> dict:
    """train/rank0.pt through the allow-list (numpy's reconstructors as inert stand-ins); {} when absent. A refused
    file (a global outside the list) is not read, and only costs the tokens-seen count (logged)."""
    from ckpteval.checkpoint.safe_pickle import RefusedPickle, torch_load

    f = step_dir(path) / TRAIN_STATE
    if not f.is_file():
        return {}
    try:
        data = torch_load(f, inert=("numpy.",))  # the RNG states: numpy arrays, kept inert
    except RefusedPickle as exc:
        log.warning("%s (tokens seen unknown)", exc)
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------- the family


class OLMoCoreFormat(CheckpointFormat):
    name = "olmo_core"
    description = ("an OLMo-core step dir (stepN with model_and_optim/, its Trainer's checkpointer) or that DCP dir; "
                   "architecture from the run's config.json (ConfigSaverCallback)")

    def looks_like(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_dir():
            return False
        dcp = dcp_dir(path)
        if (dcp / ".metadata").is_file():
            try:
                from ckpteval.checkpoint.safe_pickle import load_dcp_metadata

                return _model_prefix(load_dcp_metadata(dcp).state_dict_metadata) is not None
            except CkptEvalError:  # unreadable (still being written, or refused): a trainer step dir is ours
                return dcp != path
        return dcp != path  # stepN/model_and_optim/ without .metadata yet: ours, and incomplete

    def check_complete(self, path: Path) -> None:
        path = Path(path)
        dcp = dcp_dir(path)
        if not (dcp / ".metadata").is_file():
            raise CkptEvalError(f"OLMo-core checkpoint {path} is incomplete: {dcp.name}/.metadata is missing (still "
                                "being written, or the save crashed)")
        read_dcp_metadata(dcp)
        sd = step_dir(path)
        if (sd / TRAIN_MODULE_DIR).is_dir() and not (sd / DONE_FILE).is_file():
            raise CkptEvalError(f"OLMo-core checkpoint {sd} is incomplete: {DONE_FILE} is missing (its checkpointer "
                                "writes it last: still being written?)")

    def step_tokens(self, path: Path) -> tuple[int | None, int | None]:
        path = Path(path)
        m = STEP_DIR.match(step_dir(path).name)
        state = read_train_state(path)
        step = int(m.group(1)) if m else _common.int_or_none(state.get("global_step"))
        return step, _common.int_or_none(state.get("global_train_tokens_seen"))  # 0 at step0 is a true count

    def hf_config_dir(self, path: Path) -> Path | None:
        """A transformers config.json beside it (the run's own config.json is OLMo-core's, not transformers')."""
        d = step_dir(Path(path))
        return next((c for c in (d, d.parent) if "model_type" in _common.read_json(c / "config.json")), None)

    def tokenizer_dirs(self, path: Path) -> list[Path]:
        d = step_dir(Path(path))
        return [d, d.parent, d.parent.parent]

    # ------------------------------------------------------------------ architecture and tensors

    def _model_tensors(self, path: Path) -> dict[str, Any]:
        """{name without prefix: TensorStorageMetadata} of the model tensors (only those)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        meta = read_dcp_metadata(dcp_dir(path)).state_dict_metadata
        prefix = _model_prefix(meta)
        if prefix is None:
            raise CkptEvalError(f"checkpoint {path} is not an OLMo-core model save (no embeddings.weight / blocks.N "
                                "tensors): set ckpt_format to its family")
        return {k[len(prefix):]: m for k, m in meta.items()
                if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
                and (prefix or k.split(".", 1)[0] in ("embeddings", "blocks", "lm_head"))}

    def _layout(self, path: Path, config) -> tuple[str, str]:
        run = find_run_config(path)
        if run is not None:
            _, block, rope = hf_config_from_run(*run)
            return block, rope
        return _layout_from_hf(config)

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        path = Path(path)
        run = find_run_config(path)
        if run is not None:
            config, block, rope = hf_config_from_run(*run)
            arch = Architecture(config, f"OLMo-core run config {run[1]} ({block} blocks, {rope} RoPE -> "
                                        f"{config.architectures[0]})")
        else:
            d = step_dir(path)
            cdir = self.hf_config_dir(path)
            arch = (_common.config_json_arch(cdir) if cdir is not None else _common.model_group_arch(
                model_cfg, path, "OLMo-core", f"no run config.json (ConfigSaverCallback) or transformers config.json "
                                              f"in {d} or {d.parent}"))
        _common.check_shapes(arch.config, self.tensor_specs(path, arch.config), arch.source, path)
        return arch

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]]:
        path = Path(path)
        block, rope = self._layout(path, config)
        meta = {k: torch.empty(tuple(m.size), device="meta") for k, m in self._model_tensors(path).items()}
        return {k: tuple(v.shape) for k, v in convert_state(meta, block, rope, config, path).items()}

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        path = Path(path)
        block, rope = self._layout(path, config)
        prefix = _model_prefix(read_dcp_metadata(dcp_dir(path)).state_dict_metadata)
        wanted = {prefix + k: m for k, m in self._model_tensors(path).items()}
        raw = read_dcp_tensors(dcp_dir(path), wanted)
        state = convert_state({k[len(prefix):]: v for k, v in raw.items()}, block, rope, config, path)
        return {k: v.contiguous() for k, v in state.items()}

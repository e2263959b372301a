"""torchtitan checkpoints: DCP `step-N` dirs written by its `CheckpointManager`, and its own HF export.

A DCP `step-N` dir holds the model's own names at the top level (`tok_embeddings.weight`,
`layers.{i}.attention.wq.weight` or, since 0.3, `layers.{i}.attention.qkv_linear.wq.weight`, `feed_forward.w1/2/3`,
`attention_norm`, `ffn_norm`, `norm`, `output.weight` or `lm_head.weight`) beside `optimizer.*`, `dataloader`,
`lr_scheduler.*` and `train_state.*` entries; only the model tensors are ever read (and two small `train_state`
values for the step and tokens seen). `checkpoint.last_save_in_hf=true` writes HF-named safetensors instead, with
no config.json.

Models (by their tensors; the job config names the same): llama3 -> Llama; qwen3 -> Qwen3 / Qwen3-MoE
(`attention.q_norm/k_norm`, MoE layers `moe.router.gate`, grouped experts
`moe.routed_experts.inner_experts.w1_EFD [E, F, D]` / `w3_EFD` / `w2_EDF [E, D, F]`, the aux-loss-free
`moe.expert_bias_E`); deepseek_v3 -> DeepSeek-V3 (MLA `attention.wq|wq_a/q_norm/wq_b`, `wkv_a/kv_norm/wkv_b`,
shared experts `moe.shared_experts.w1/2/3`; the multi-token-prediction `mtp_layers.*` are not part of next-token
evaluation and are left unread). Tensors are returned in the hub layout (experts split per expert, the names
torchtitan's own state-dict adapters give them); transformers fuses them on load. A model tensor with no place
here is an error naming it, never silently dropped. The router mapping and what is refused: `_titan_arch.py`;
an expert_bias that changes routing in a softmax router: `_moe.py`.

torchtitan's llama3 attention applies RoPE to *adjacent* pairs of q/k rows (complex multiplication),
transformers' Llama to rows `j` and `j + head_dim/2` (rotate_half). Renaming alone gives a model that runs but
computes a different function (loss off by ~1e-3), so q/k rows are permuted per head (`rope_pairs_to_halves`).
qwen3 uses the half-split layout already (CosSinRoPE); deepseek_v3's interleaved rotary part is what
transformers' DeepSeek-V3 applies with `rope_interleave` (no permutation either).

The architecture comes from a config.json in or beside the checkpoint, else torchtitan's job config dump
(`debug.save_config_file`, e.g. `job_config.json`, or the TOML the run was launched with) found in the checkpoint
dir or its parents up to the run dir, else the `model` group; the tensors are checked against whichever is used.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ckpteval.checkpoint.formats._common import architecture_from_sources, one_line, rope_pairs_to_halves
from ckpteval.checkpoint.formats._dcp import (
    TRAINER_ENTRIES,
    read_dcp_metadata,
    read_dcp_object,
    read_dcp_tensors,
)
from ckpteval.checkpoint.formats._titan_arch import config_from_titan
from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
JOB_CONFIG_NAMES = ("job_config.json", "job_config.toml", "config.toml")
PARENT_LEVELS = 3  # step-N -> checkpoint/ -> run dir (dump_folder): where torchtitan writes its job config
_LAYER = r"layers\.(\d+)\."
# torchtitan name (after the layer prefix) -> HF checkpoint name; both q/k spellings across versions.
GQA_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.qkv_linear.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.qkv_linear.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.qkv_linear.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
}
QK_NORM_MAP = {"attention.q_norm.weight": "self_attn.q_norm.weight",
               "attention.k_norm.weight": "self_attn.k_norm.weight"}
MLA_MAP = {  # torchtitan's DeepSeekV3StateDictAdapter names
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq_a.weight": "self_attn.q_a_proj.weight",
    "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attention.wq_b.weight": "self_attn.q_b_proj.weight",
    "attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
}
BLOCK_MAP = {
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
    "moe.expert_bias_E": "mlp.gate.e_score_correction_bias",
    "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
EXPERTS = ("moe.routed_experts.inner_experts.w1_EFD", "moe.routed_experts.inner_experts.w3_EFD",
           "moe.routed_experts.inner_experts.w2_EDF")  # gate [E, F, D], up [E, F, D], down [E, D, F]
EXPERT_BIAS = "mlp.gate.e_score_correction_bias"
TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight"}
UNREAD = ("mtp_layers.",)  # deepseek_v3's multi-token-prediction modules: not part of next-token evaluation


def model_kind(keys) -> str:
    """llama3, qwen3 or deepseek_v3, from the tensor names alone (the same answer whatever the architecture
    source): MLA's `wkv_a` is deepseek_v3, per-head q/k norms are qwen3."""
    keys = list(keys)
    if any(re.match(_LAYER + r"attention\.wkv_a\.", k) for k in keys):
        return "deepseek_v3"
    if any(re.match(_LAYER + r"attention\.[qk]_norm\.", k) for k in keys):
        return "qwen3"
    return "llama3"


def layer_map(kind: str) -> dict[str, str]:
    attention = MLA_MAP if kind == "deepseek_v3" else {**GQA_MAP, **(QK_NORM_MAP if kind == "qwen3" else {})}
    return {**attention, **BLOCK_MAP}


def _hf_name(key: str, kind: str = "llama3") -> str | None:
    """The HF checkpoint name of one torchtitan tensor (None for grouped experts and for names with no place)."""
    if key in TOP_MAP:
        return TOP_MAP[key]
    m = re.match(_LAYER + r"(.+)$", key)
    if m and m.group(2) in layer_map(kind):
        return f"model.layers.{m.group(1)}.{layer_map(kind)[m.group(2)]}"
    return None


def to_hub(raw: dict[str, Any], kind: str) -> dict[str, Any]:
    """torchtitan tensors (or meta tensors, for shapes) -> HF checkpoint names and layouts, grouped experts split
    per expert. Every key must have a place (`model_keys` checked that)."""
    from ckpteval.checkpoint.formats._moe import split_experts

    out, grouped = {}, {}
    for key, t in raw.items():
        m = re.match(_LAYER + r"(.+)$", key)
        if m and m.group(2) in EXPERTS:
            grouped.setdefault(int(m.group(1)), [None] * 3)[EXPERTS.index(m.group(2))] = t
        else:
            out[_hf_name(key, kind)] = t
    for i, (gate, up, down) in sorted(grouped.items()):
        out.update(split_experts(f"model.layers.{i}.", "qwen3_moe", gate, up, down))
    return out


# ---------------------------------------------------------------------------------------------- job config


def find_job_config(path: Path) -> Path | None:
    """torchtitan's job config dump (or launch TOML) in the checkpoint dir or its parents up to the run dir."""
    d = path if path.is_dir() else path.parent
    for _ in range(PARENT_LEVELS + 1):
        for name in JOB_CONFIG_NAMES:
            if (d / name).is_file() and _read_job_config(d / name):
                return d / name
        d = d.parent
    return None


def _read_job_config(path: Path) -> dict:
    """The job config as a dict when it describes a torchtitan model (`model_spec` or `model.name`), else {}."""
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    if isinstance(data.get("model_spec"), dict) or (isinstance(data.get("model"), dict) and "name" in data["model"]):
        return data
    return {}


def _model_dict_from_job(path: Path, data: dict) -> tuple[str, dict, str]:
    """(model name, the model config as a plain dict, source line): torchtitan >= 0.3 dumps it whole
    (`model_spec.model`); older job configs only name `model.name` / `model.flavor`, resolved through torchtitan's
    own model registry."""
    spec = data.get("model_spec")
    if isinstance(spec, dict) and isinstance(spec.get("model"), dict):
        return (str(spec.get("name")), spec["model"],
                f"torchtitan job config {path} (model_spec {spec.get('name')}/{spec.get('flavor')})")
    named = spec if isinstance(spec, dict) else data["model"]
    name, flavor = str(named.get("name")), str(named.get("flavor"))
    source = f"torchtitan job config {path} ({name} flavor {flavor}, from torchtitan's model registry)"
    return name, _flavor_from_registry(path, name, flavor), source


def _flavor_from_registry(path: Path, name: str, flavor: str) -> dict:
    import importlib

    try:
        module = importlib.import_module(f"torchtitan.models.{name}")
    except ImportError as exc:
        raise CkptEvalError(
            f"torchtitan job config {path} names model {name} flavor {flavor}, but torchtitan cannot be imported "
            f"to look the flavor up ({exc}): pip install 'ckpteval[titan]', or put a transformers config.json in "
            f"or beside the checkpoint") from None
    if hasattr(module, "model_registry"):  # torchtitan >= 0.3: a registry of config dataclasses
        return module.model_registry(flavor).model.to_dict()
    configs = next((getattr(module, a) for a in dir(module) if a.endswith("_configs")), {})
    if flavor not in configs:
        raise CkptEvalError(f"torchtitan job config {path}: flavor {flavor} is not in torchtitan's {name} "
                            f"registry ({', '.join(configs) or 'none found'}): put a config.json beside the checkpoint")
    args = configs[flavor]  # torchtitan < 0.3: TransformerModelArgs
    return {"legacy_args": {k: getattr(args, k) for k in dir(args) if not k.startswith("_")
                            and isinstance(getattr(args, k), (int, float, bool, type(None)))}}


# ---------------------------------------------------------------------------------------------- the family


def _is_titan_key_set(keys) -> bool:
    keys = set(keys)
    return "tok_embeddings.weight" in keys and any(re.match(_LAYER + r"(attention|feed_forward)\.", k) for k in keys)


class TorchTitanFormat(CheckpointFormat):
    name = "torchtitan"
    description = ("a torchtitan DCP step dir (checkpoint/step-N) or its HF export (last_save_in_hf); architecture "
                   "from config.json, else torchtitan's job config dump, else the model group")

    # ------------------------------------------------------------------ cheap questions

    def _is_hf_export(self, path: Path) -> bool:
        if not path.is_dir() or (path / "config.json").is_file() or (path / ".metadata").is_file():
            return False
        if not ((path / "model.safetensors.index.json").is_file() or any(path.glob("model*.safetensors"))):
            return False
        # torchtitan writes sharded/shard-*.safetensors beside the export; else a step-N name or its job config
        return (path / "sharded").is_dir() or bool(STEP_DIR.match(path.name)) or find_job_config(path) is not None

    def looks_like(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_dir():
            return False
        if (path / ".metadata").is_file():
            try:
                from ckpteval.checkpoint.safe_pickle import load_dcp_metadata

                return _is_titan_key_set(load_dcp_metadata(path).state_dict_metadata)
            except CkptEvalError:
                # unreadable (still being written): a step-N dir is ours, so check_complete says what is wrong
                return bool(STEP_DIR.match(path.name))
        return self._is_hf_export(path)

    def check_complete(self, path: Path) -> None:
        path = Path(path)
        if (path / ".metadata").is_file():
            read_dcp_metadata(path)
            return
        if any(path.glob("*.distcp")):
            raise CkptEvalError(f"torchtitan checkpoint {path} is incomplete: *.distcp files but no .metadata (still "
                                "being written, or the save crashed)")
        from ckpteval.checkpoint.formats.hf import hf_weight_files

        if not hf_weight_files(path):
            raise CkptEvalError(f"torchtitan HF export {path} has no safetensors weights")

    def step_tokens(self, path: Path) -> tuple[int | None, int | None]:
        path = Path(path)
        m = STEP_DIR.match(path.name)
        step, tokens = (int(m.group(1)) if m else None), None
        if (path / ".metadata").is_file():
            meta = read_dcp_metadata(path)
            if step is None:
                step = _int(read_dcp_object(path, meta, "train_state.step"))
            tokens = _int(read_dcp_object(path, meta, "train_state.ntokens_seen")) or None
        return step, tokens

    def tokenizer_dirs(self, path: Path) -> list[Path]:
        """The checkpoint dir and its parents up to the run dir, then the job config's `hf_assets_path`."""
        base = path if path.is_dir() else path.parent
        dirs = [base, *list(base.parents)[:PARENT_LEVELS]]
        job = find_job_config(base)
        assets = (_read_job_config(job) if job else {}).get("hf_assets_path")
        if isinstance(assets, str):
            a = Path(assets)
            dirs.append(a if a.is_absolute() else job.parent / a)
        return dirs

    # ------------------------------------------------------------------ architecture and tensors

    def _model_keys(self, path: Path) -> dict[str, Any]:
        """{torchtitan key: TensorStorageMetadata} of the model tensors (trainer entries and `mtp_layers` left
        out); a model tensor with no place in the transformers model is an error naming it."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        meta = {k: m for k, m in read_dcp_metadata(path).state_dict_metadata.items()
                if isinstance(m, TensorStorageMetadata) and k.split(".", 1)[0] not in TRAINER_ENTRIES
                and not k.startswith(UNREAD)}
        kind = model_kind(meta)
        for key in meta:
            m = re.match(_LAYER + r"(.+)$", key)
            if _hf_name(key, kind) is None and not (m and m.group(2) in EXPERTS):
                raise CkptEvalError(f"torchtitan checkpoint {path} holds {key}, which has no transformers {kind} "
                                    "counterpart here: export it with torchtitan's own state-dict adapter "
                                    "(checkpoint.last_save_in_hf) and put a config.json beside it")
        return meta

    def _hub_shapes(self, path: Path) -> dict[str, tuple[int, ...]]:
        """{HF checkpoint name: shape} from metadata only."""
        if (path / ".metadata").is_file():
            keys = self._model_keys(path)
            meta = {k: torch.empty(tuple(m.size), device="meta") for k, m in keys.items()}
            return {k: tuple(v.shape) for k, v in to_hub(meta, model_kind(keys)).items()}
        from ckpteval.checkpoint.formats.hf import hf_weight_files, safetensors_header

        shapes = {}
        for f in hf_weight_files(path):
            shapes.update({k: tuple(v["shape"]) for k, v in safetensors_header(f).items() if k != "__metadata__"})
        return shapes

    def _expert_bias(self, path: Path) -> dict[str, torch.Tensor]:
        """{HF name: expert_bias} of each MoE layer (L x E floats: cheap), {} for a dense model or the HF export."""
        if not (path / ".metadata").is_file():
            return {}
        keys = self._model_keys(path)
        wanted = {k: m for k, m in keys.items() if k.endswith("moe.expert_bias_E")}
        return {_hf_name(k, model_kind(keys)): v for k, v in read_dcp_tensors(path, wanted).items()} if wanted else {}

    def _routing(self, path: Path, config) -> None:
        """An expert_bias that is non-zero changes which experts a token picks: exact on the classes that hold one
        (DeepSeek-V3's sigmoid router), else torchtitan's own router computed by `_moe.TrainerRouter` in place of
        a softmax router (torchtitan's Qwen3-MoE), refused elsewhere."""
        from ckpteval.checkpoint.formats._moe import CONFIG_FLAG, ROUTER_TYPES

        if not any(bool(b.any()) for b in self._expert_bias(path).values()) or _has_bias(config):
            return
        if config.model_type not in ROUTER_TYPES:
            raise CkptEvalError(f"torchtitan checkpoint {path} routes with a non-zero aux-loss-free expert_bias, "
                                f"which transformers' {config.model_type} has no place for: not supported")
        log.info("torchtitan checkpoint %s: its expert_bias changes routing and no transformers softmax router has "
                 "one, so its router is computed exactly as torchtitan does (mode=convert refuses it)", path.name)
        setattr(config, CONFIG_FLAG, {"score_func": "softmax", "route_scale": 1.0,
                                      "route_norm": bool(getattr(config, "norm_topk_prob", True))})

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        path = Path(path)
        shapes = self._hub_shapes(path)

        def from_job() -> Architecture | None:
            job = find_job_config(path)
            if job is None:
                return None
            name, model, source = _model_dict_from_job(job, _read_job_config(job))
            try:
                return Architecture(config_from_titan(name, model, shapes, source), source)
            except CkptEvalError:
                raise
            except Exception as e:  # noqa: BLE001 - a dump missing a field, transformers' strict config validation
                raise CkptEvalError(f"{source} does not describe a {name} model transformers can build "
                                    f"({type(e).__name__}: {one_line(e)}): put a transformers config.json beside the "
                                    "checkpoint") from None

        arch = architecture_from_sources(path, model_cfg, lambda config: self._specs(shapes, config), from_job,
                                         "torchtitan", adjust=lambda config: self._routing(path, config))
        if not (path / ".metadata").is_file() and getattr(arch.config, "num_experts", None) and any(
                (layer.get("moe") or {}).get("load_balance_coeff") for layer in _job_layers(path)):
            log.warning("torchtitan HF export %s: torchtitan's state-dict adapter drops the aux-loss-free "
                        "expert_bias, so these weights route without it (the DCP checkpoint of the same step "
                        "routes with it, and may score differently)", path)
        return arch

    @staticmethod
    def _specs(shapes: dict[str, tuple[int, ...]], config) -> dict[str, tuple[int, ...]]:
        """The shapes the model of `config` takes: no expert_bias where it has no place (all zero: checked when
        read), a zero one where the class has one and the run trained without (`_bias_defaults`), no head when
        tied."""
        out = {k: v for k, v in shapes.items() if _has_bias(config) or not k.endswith(EXPERT_BIAS)}
        out.update(_bias_defaults(out, config))
        if getattr(config, "tie_word_embeddings", False):
            out.pop("lm_head.weight", None)
        return out

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]]:
        return self._specs(self._hub_shapes(Path(path)), config)

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        path = Path(path)
        if not (path / ".metadata").is_file():  # torchtitan's HF export: HF names, already in HF's RoPE layout
            from safetensors.torch import load_file

            from ckpteval.checkpoint.formats.hf import hf_weight_files

            state = {}
            for f in hf_weight_files(path):
                state.update(load_file(str(f)))
        else:
            keys = self._model_keys(path)
            kind = model_kind(keys)
            state = to_hub(read_dcp_tensors(path, keys), kind)
            if kind == "llama3":  # interleaved RoPE pairs -> transformers' halves (qwen3, deepseek_v3: no)
                n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
                for name in list(state):
                    if name.endswith("self_attn.q_proj.weight"):
                        state[name] = rope_pairs_to_halves(state[name], n_heads)
                    elif name.endswith("self_attn.k_proj.weight"):
                        state[name] = rope_pairs_to_halves(state[name], n_kv)
        state.update({k: torch.zeros(shape) for k, shape in _bias_defaults(state, config).items()})
        if not _has_bias(config):
            for name in [k for k in state if k.endswith(EXPERT_BIAS)]:
                if bool(state.pop(name).any()):  # only an architecture source that ignored it gets here
                    raise CkptEvalError(f"torchtitan checkpoint {path}: {name} is non-zero (it changes routing) but "
                                        f"the architecture ({config.model_type}) has no place for it: not supported")
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return state


def _has_bias(config) -> bool:
    """Does the model of `config` hold an expert_bias (`mlp.gate.e_score_correction_bias`)?"""
    from ckpteval.checkpoint.formats._moe import CONFIG_FLAG

    return bool(getattr(config, CONFIG_FLAG, None)) or config.model_type in ("deepseek_v3",)


def _bias_defaults(state: dict, config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of zero expert biases for the MoE layers of a class that holds one (DeepSeek-V3) when the run
    trained without (`load_balance_coeff=None`): a zero bias routes exactly as none. `state`: names -> tensors or
    shapes."""
    if not _has_bias(config):
        return {}
    out = {}
    for name, value in state.items():
        gate = name.removesuffix("weight")
        if name.endswith("mlp.gate.weight") and gate + "e_score_correction_bias" not in state:
            rows = value.shape[0] if hasattr(value, "shape") else value[0]  # experts
            out[gate + "e_score_correction_bias"] = (rows,)
    return out


def _job_layers(path: Path) -> list[dict]:
    job = find_job_config(path)
    spec = (_read_job_config(job) if job else {}).get("model_spec") or {}
    layers = (spec.get("model") or {}).get("layers") if isinstance(spec, dict) else None
    return [layer for layer in layers if isinstance(layer, dict)] if isinstance(layers, list) else []


def _int(value) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

"""torchtitan checkpoints: DCP `step-N` dirs written by its `CheckpointManager`, and its own HF export.

A DCP `step-N` dir holds the model's own names at the top level (`tok_embeddings.weight`,
`layers.{i}.attention.wq.weight` or, since 0.3, `layers.{i}.attention.qkv_linear.wq.weight`, `feed_forward.w1/2/3`,
`attention_norm`, `ffn_norm`, `norm`, `output.weight` or `lm_head.weight`) beside `optimizer.*`, `dataloader`,
`lr_scheduler.*` and `train_state.*` entries; only the model tensors are ever read (and two small `train_state`
values for the step and tokens seen). `checkpoint.last_save_in_hf=true` writes HF-named safetensors instead, with
no config.json.

torchtitan's attention applies RoPE to *adjacent* pairs of q/k rows (complex multiplication), transformers' Llama to
rows `j` and `j + head_dim/2` (rotate_half). Renaming alone gives a model that runs but computes a different
function (loss off by ~1e-3), so q/k rows are permuted per head (`rope_pairs_to_halves`).

The architecture comes from a config.json in or beside the checkpoint, else torchtitan's job config dump
(`debug.save_config_file`, e.g. `job_config.json`, or the TOML the run was launched with) found in the checkpoint
dir or its parents up to the run dir, else the `model` group; the tensors are checked against whichever is used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ckpteval.checkpoint.formats._common import architecture_from_sources, rope_pairs_to_halves
from ckpteval.checkpoint.formats._dcp import read_dcp_metadata, read_dcp_object, read_dcp_tensors
from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError

STEP_DIR = re.compile(r"^step-(\d+)$")
JOB_CONFIG_NAMES = ("job_config.json", "job_config.toml", "config.toml")
PARENT_LEVELS = 3  # step-N -> checkpoint/ -> run dir (dump_folder): where torchtitan writes its job config
_LAYER = r"layers\.(\d+)\."
# torchtitan name (after the layer prefix) -> transformers Llama name; both q/k spellings across versions.
LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.qkv_linear.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.qkv_linear.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.qkv_linear.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight"}


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


def _model_dict_from_job(path: Path, data: dict) -> tuple[dict, str]:
    """The model config as a plain dict: torchtitan >= 0.3 dumps it whole (`model_spec.model`); older job
    configs only name `model.name` / `model.flavor`, resolved through torchtitan's own model registry."""
    spec = data.get("model_spec")
    if isinstance(spec, dict) and isinstance(spec.get("model"), dict):
        return spec["model"], f"torchtitan job config {path} (model_spec {spec.get('name')}/{spec.get('flavor')})"
    named = spec if isinstance(spec, dict) else data["model"]
    name, flavor = str(named.get("name")), str(named.get("flavor"))
    source = f"torchtitan job config {path} ({name} flavor {flavor}, from torchtitan's model registry)"
    return _flavor_from_registry(path, name, flavor), source


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


def llama_config_from_titan(model: dict, shapes: dict[str, tuple[int, ...]]):
    """A transformers LlamaConfig from torchtitan's model config dict; sizes a config may leave to the
    tokenizer (vocab) or to a formula (FFN width) come from the tensors themselves."""
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
        rcfg = attn.get("rope") or {}
        theta, max_pos, rope = rcfg.get("theta", 10000.0), rcfg.get("max_seq_len", 2048), {}
        if rcfg.get("scaling", "none") == "llama":
            rope = {"rope_type": "llama3", "factor": rcfg["scaling_factor"], "low_freq_factor":
                    rcfg["low_freq_factor"], "high_freq_factor": rcfg["high_freq_factor"],
                    "original_max_position_embeddings": rcfg["original_max_position_embeddings"]}
        elif rcfg.get("scaling", "none") != "none":
            raise CkptEvalError(f"torchtitan RoPE scaling {rcfg['scaling']!r} has no transformers Llama "
                                "equivalent here: convert the checkpoint with torchtitan's own HF export")
    vocab = shapes.get("model.embed_tokens.weight", (model.get("vocab_size") or 0,))[0]
    ffn = shapes.get("model.layers.0.mlp.gate_proj.weight", (None,))[0]
    return LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=n_layers,
                       num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
                       rms_norm_eps=eps, rope_theta=float(theta), rope_scaling=rope or None,
                       max_position_embeddings=max(max_pos, rope.get("original_max_position_embeddings", 0) + 1),
                       tie_word_embeddings=tied, attention_bias=False, mlp_bias=False,
                       architectures=["LlamaForCausalLM"])


# ---------------------------------------------------------------------------------------------- the family


def _hf_name(key: str) -> str | None:
    if key in TOP_MAP:
        return TOP_MAP[key]
    m = re.match(_LAYER + r"(.+)$", key)
    if m and m.group(2) in LAYER_MAP:
        return f"model.layers.{m.group(1)}.{LAYER_MAP[m.group(2)]}"
    return None


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

    def _dcp_sources(self, path: Path) -> dict[str, tuple[str, Any]]:
        """{HF name: (torchtitan key, TensorStorageMetadata)} of the model tensors (only those)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        out = {}
        for key, meta in read_dcp_metadata(path).state_dict_metadata.items():
            hf = _hf_name(key)
            if hf is not None and isinstance(meta, TensorStorageMetadata):
                out[hf] = (key, meta)
        return out

    def _raw_shapes(self, path: Path) -> dict[str, tuple[int, ...]]:
        if (path / ".metadata").is_file():
            return {hf: tuple(meta.size) for hf, (_, meta) in self._dcp_sources(path).items()}
        from ckpteval.checkpoint.formats.hf import hf_weight_files, safetensors_header

        shapes = {}
        for f in hf_weight_files(path):
            shapes.update({k: tuple(v["shape"]) for k, v in safetensors_header(f).items() if k != "__metadata__"})
        return shapes

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        path = Path(path)
        shapes = self._raw_shapes(path)

        def from_job() -> Architecture | None:
            job = find_job_config(path)
            if job is None:
                return None
            model, source = _model_dict_from_job(job, _read_job_config(job))
            return Architecture(llama_config_from_titan(model, shapes), source)

        return architecture_from_sources(path, model_cfg, shapes, from_job, "torchtitan")

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]]:
        shapes = self._raw_shapes(Path(path))
        if getattr(config, "tie_word_embeddings", False):
            shapes.pop("lm_head.weight", None)
        return shapes

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        path = Path(path)
        if not (path / ".metadata").is_file():  # torchtitan's HF export: HF names, already in HF's RoPE layout
            from safetensors.torch import load_file

            from ckpteval.checkpoint.formats.hf import hf_weight_files

            state = {}
            for f in hf_weight_files(path):
                state.update(load_file(str(f)))
        else:
            sources = self._dcp_sources(path)
            raw = read_dcp_tensors(path, {key: meta for key, meta in sources.values()})
            state = {hf: raw[key] for hf, (key, _) in sources.items()}
            n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
            for name in list(state):
                if name.endswith("self_attn.q_proj.weight"):
                    state[name] = rope_pairs_to_halves(state[name], n_heads)
                elif name.endswith("self_attn.k_proj.weight"):
                    state[name] = rope_pairs_to_halves(state[name], n_kv)
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return state


def _int(value) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

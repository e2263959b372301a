"""One registry of checkpoint families; each family is one small module implementing `base.CheckpointFormat`.

    fmt = detect_format(path)                 # the first family whose looks_like(path) is true (cheap)
    fmt = detect_format(path, forced="torchtitan")   # ckpt_format=torchtitan: that family, no guessing

Order matters: more specific families come first (a torchtitan DCP dir is also a DCP dir).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError

# name -> "module:Class", in detection order. Families add one line here.
REGISTRY: dict[str, str] = {
    # torchtitan and megatron first: their dirs are DCP dirs too, so they must be asked before `dcp`; torchtitan's
    # HF export (safetensors, no config.json) must be asked before `hf`.
    "torchtitan": "ckpteval.checkpoint.formats.torchtitan:TorchTitanFormat",
    "megatron": "ckpteval.checkpoint.formats.megatron:MegatronFormat",
    # OLMo-core's model_and_optim/ is a DCP dir too (its step dir holds it); litgpt's step dir may hold a copied
    # HF config.json, so both come before `dcp` and `hf`.
    "olmo_core": "ckpteval.checkpoint.formats.olmo_core:OLMoCoreFormat",
    "litgpt": "ckpteval.checkpoint.formats.litgpt:LitGPTFormat",
    # accelerate's pytorch_model_fsdp_0 is a DCP dir too (and its checkpoint-N holds no HF weights)
    "fsdp": "ckpteval.checkpoint.formats.fsdp:FSDPFormat",
    "dcp": "ckpteval.checkpoint.formats.dcp:DCPFormat",
    # a PEFT adapter dir holds no whole-model weights; asked before `hf`, which would call it a model without weights
    "peft": "ckpteval.checkpoint.formats.peft:PeftFormat",
    "hf": "ckpteval.checkpoint.formats.hf:HFFormat",
    # after hf: a ZeRO-1/2 Trainer checkpoint-N also holds model.safetensors and stays an HF dir (ckpt_format=deepspeed
    # reads its fp32 partitions instead); ZeRO-3 ones and bare DeepSpeed save dirs hold no HF weights
    "deepspeed": "ckpteval.checkpoint.formats.deepspeed:DeepSpeedFormat",
    "gguf": "ckpteval.checkpoint.formats.gguf:GGUFFormat",
    "lightning": "ckpteval.checkpoint.formats.lightning:LightningFormat",
    "nanogpt": "ckpteval.checkpoint.formats.nanogpt:NanoGPTFormat",
}

_instances: dict[str, CheckpointFormat] = {}


def get_format(name: str) -> CheckpointFormat:
    if name not in REGISTRY:
        raise CkptEvalError(f"ckpt_format={name} is unknown: use one of {', '.join(REGISTRY)} (or leave it unset "
                            "to detect the format from the path)")
    if name not in _instances:
        module, cls = REGISTRY[name].split(":")
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]


def all_formats() -> list[CheckpointFormat]:
    return [get_format(name) for name in REGISTRY]


def detect_format(path: Path, forced: str | None = None) -> CheckpointFormat | None:
    """The family of `path` (None when no family claims it); `forced` skips detection."""
    if forced:
        return get_format(forced)
    return next((fmt for fmt in all_formats() if fmt.looks_like(path)), None)


__all__ = ["Architecture", "CheckpointFormat", "REGISTRY", "all_formats", "detect_format", "get_format"]

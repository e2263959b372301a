"""The contract every checkpoint family implements (one small module per family, see `formats/__init__.py`).

A family answers five questions about a path, each cheaply except the last:

1. `looks_like(path)`: is this mine? Names, small JSON files, headers, DCP `.metadata` key names: never tensors.
2. `check_complete(path)`: is it finished by my own rules? Raises `CkptEvalError` saying what is missing.
3. `step_tokens(path)`: the training step and tokens seen it carries (None when unknown).
4. `architecture(path, model_cfg)`: the transformers config it holds, and a line saying where it came from
   (config.json, the trainer's saved config, the `model` group, ...). Raises naming the override that fixes it.
5. `tensor_specs(path, config)` / `read_state(path, config)`: {HF tensor name: shape} from metadata only (so a
   model built on the meta device is checked before any real allocation), and the model tensors themselves in
   HF checkpoint names and layouts, i.e. what `save_pretrained` writes to the hub (renames, fused QKV / gate-up
   splits, per-layer un-stacking, per-expert splits, RoPE permutes, tied heads done here). `load.py` turns that
   layout into the model's own parameters with transformers' weight conversion (transformers 5 fuses MoE experts
   on load), for the meta check and the load alike. Only model tensors are ever read; trainer state never.

`sharded_dcp_prefix` is set by families whose DCP tensors already carry HF names in HF layout: those are read
straight into FSDP/TP-sharded models (each rank reads its own shards). Every other family is read whole and
then laid out (`parallel.load_eval_model` does that).

An adapter family (`AdapterFormat`, e.g. PEFT LoRA) holds a change to another checkpoint, its base: it names
the base (`base_location`; `detect` inspects it like any checkpoint), describes the model the two make together
(`adapted_architecture`, the adapter's tensors checked against the base's architecture on the `meta` device),
and merges itself into a loaded base with an exact undo (`apply`), so a scan loads the base once
(`checkpoint.base_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch


@dataclass
class Architecture:
    config: Any  # a transformers PretrainedConfig
    source: str  # where it came from, for the log line: "config.json in /x", "torchtitan job_config.json", ...


class CheckpointFormat:
    name: ClassVar[str]  # the value of `ckpt_format=` that forces this family
    description: ClassVar[str]  # one line for errors and the README table: what the user points ckpt= at

    def looks_like(self, path: Path) -> bool:
        raise NotImplementedError

    def resolve(self, path: Path) -> Path:
        """The checkpoint proper when the user pointed at its container (a dir holding one .gguf, a nanoGPT
        out_dir holding ckpt.pt); the path itself by default. Every other method gets the resolved path."""
        return path

    def check_complete(self, path: Path) -> None:
        raise NotImplementedError

    def step_tokens(self, path: Path) -> tuple[int | None, int | None]:
        return None, None

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        raise NotImplementedError

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]] | None:
        """{HF checkpoint name: shape} of every tensor `read_state` will return, from metadata only (None: the
        family's own reader checks names and shapes against the architecture it read from the same file, e.g.
        GGUF)."""
        raise NotImplementedError

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        """The model tensors in HF checkpoint names and layouts (full, unsharded, on CPU)."""
        raise NotImplementedError

    def sharded_dcp_prefix(self, path: Path) -> str | None:
        """The key prefix when this is a DCP dir with HF names (read straight into sharded models), else None."""
        return None

    def tokenizer_dirs(self, path: Path) -> list[Path]:
        """Where to look for a tokenizer, in order (default: the checkpoint dir, then its parent)."""
        base = path if path.is_dir() else path.parent
        return [base, base.parent]

    def hf_config_dir(self, path: Path) -> Path | None:
        """Where a transformers config.json of this checkpoint sits (inspect_checkpoint validates it before any
        load; default: the checkpoint dir, then its parent). None when the family's architecture comes from
        elsewhere and a config.json there is the trainer's own (OLMo-core's run config) or not read (litgpt)."""
        base = path if path.is_dir() else path.parent
        return next((d for d in (base, base.parent) if (d / "config.json").is_file()), None)

class AdapterFormat(CheckpointFormat):
    """A checkpoint that is a change to a base model, not a whole model. `load.load_model` loads the base (any
    family) and applies the adapter; `architecture`/`tensor_specs`/`read_state` are never asked of an adapter."""

    def base_location(self, path: Path, override: str | None) -> Path:
        """The base checkpoint's local path: `override` (ckpt_base=) when given, else the one the adapter names,
        resolved offline. Raises `CkptEvalError` naming `ckpt_base=PATH` when it is not available."""
        raise NotImplementedError

    def adapted_architecture(self, path: Path, base: Architecture) -> Architecture:
        """The architecture of base + adapter (the base's, e.g. with a resized vocabulary), after checking the
        adapter's tensors against it on the `meta` device (one clear error for an adapter of another model)."""
        raise NotImplementedError

    def apply(self, model: torch.nn.Module, path: Path, previous=None):
        """Merge the adapter into `model` (the loaded base, built for `adapted_architecture`) in place; returns a
        no-argument callable that restores the base exactly (its own tensors, not a recomputation). `previous`:
        the callable this family returned for the adapter merged into `model` before, already run (a scan's base
        is shared): whatever the family kept in it for reuse may serve this adapter."""
        raise NotImplementedError

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        raise NotImplementedError("an adapter's architecture is adapted_architecture(path, base)")

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]] | None:
        raise NotImplementedError("an adapter is applied to its base, not read as a state dict")

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        raise NotImplementedError("an adapter is applied to its base, not read as a state dict")

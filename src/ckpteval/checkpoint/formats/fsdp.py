"""HF Trainer / accelerate FSDP checkpoints saved with SHARDED_STATE_DICT, evaluated without a merge step.

    ckpt=out/checkpoint-500                          # the Trainer's checkpoint dir (no config.json, no weights file)
    ckpt=out/checkpoint-500/pytorch_model_fsdp_0     # the DCP dir accelerate's save_fsdp_model writes into it
    ckpt=out/checkpoint-500 ckpt_config=out/config.json   # a run that kept its config.json elsewhere

accelerate saves `{"model": <the model's state dict>}` with torch.distributed.checkpoint, so every tensor is
`model.<HF name>`: FSDP2's `get_model_state_dict` and FSDP1's sharded state dict both give the module's own names.
Wrapper fragments a save may have kept (`_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`, `_orig_mod.` of a
compiled model) are dropped. `optimizer_0/`, scheduler.pt, rng_state_*.pth and training_args.bin beside it are never
opened.

Architecture: with FSDP on, the Trainer writes no config.json into checkpoint-N; the run keeps it in its output dir
(`trainer.save_model()` after switching to FULL_STATE_DICT, or `model.config.save_pretrained(output_dir)`). So:
config.json in the DCP dir, its checkpoint-N, or up to two dirs above (the output dir; accelerate's `save_state`
nests `checkpoints/checkpoint_N` one deeper), else `ckpt_config=PATH`, else the `model` group; the tensors' shapes are
checked against it before anything is allocated. Step and tokens: the dir name, HF Trainer's trainer_state.json.
Read: only the model's tensors, straight into FSDP/TP shards under `parallel=` (each rank reads its own bytes).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ckpteval.checkpoint.formats import _common
from ckpteval.checkpoint.formats._dcp import read_dcp_metadata, read_dcp_tensors
from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError

MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's {FSDP_MODEL_NAME}_{model_index}: the Trainer's model is index 0
FSDP_DIR = re.compile(r"^pytorch_model_fsdp_\d+$")
# accelerate's other layouts: per-rank torch.save files (LOCAL_STATE_DICT, or SHARDED_STATE_DICT with use_dcp=False)
PER_RANK = re.compile(r"^pytorch_model_fsdp(_\d+)?_rank\d+\.bin$")
PREFIX = "model."  # accelerate saves {"model": state_dict}
WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
RUN_LEVELS = 3  # pytorch_model_fsdp_0 -> checkpoint-N -> output dir (-> accelerate's project dir)


def _per_rank_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if PER_RANK.match(p.name)) if path.is_dir() else []


def clean_name(key: str) -> str:
    """A saved key without accelerate's `model.` and without wrapper fragments."""
    name = key[len(PREFIX):]
    for fragment in WRAPPER_FRAGMENTS:
        name = name.replace(fragment, "")
    return name


class FSDPFormat(CheckpointFormat):
    name = "fsdp"
    description = ("an HF Trainer / accelerate FSDP checkpoint (checkpoint-N holding pytorch_model_fsdp_0/, or that "
                   "DCP dir)")

    # ------------------------------------------------------------------ cheap questions

    def looks_like(self, path: Path) -> bool:
        if not path.is_dir():
            return False
        return bool(FSDP_DIR.match(path.name)) or (path / MODEL_DIR).is_dir() or bool(_per_rank_files(path))

    def resolve(self, path: Path) -> Path:
        return path / MODEL_DIR if not FSDP_DIR.match(path.name) and (path / MODEL_DIR).is_dir() else path

    def check_complete(self, path: Path) -> None:
        if not FSDP_DIR.match(path.name):  # a container without pytorch_model_fsdp_0: per-rank files only
            files = _per_rank_files(path)
            raise CkptEvalError(f"FSDP checkpoint {path} holds per-rank torch.save files ({files[0]}, ...: "
                                "LOCAL_STATE_DICT, or SHARDED_STATE_DICT saved with use_dcp=False), which are not "
                                "read: save with SHARDED_STATE_DICT and use_dcp=True (accelerate's default) or "
                                "FULL_STATE_DICT")
        if not (path / ".metadata").is_file():
            raise CkptEvalError(f"checkpoint {path} is incomplete: no .metadata (still being written, or the save "
                                "crashed)")
        if not self._key_map(path):
            raise CkptEvalError(f"FSDP checkpoint {path} holds no model.* tensors: it is not a model saved by "
                                "accelerate's save_fsdp_model (an optimizer_0 dir?)")

    def step_tokens(self, path: Path) -> tuple[int | None, int | None]:
        return _common.metadata_step_tokens(path.parent)  # checkpoint-N's trainer_state.json

    def tokenizer_dirs(self, path: Path) -> list[Path]:
        return _common.run_dirs(path, RUN_LEVELS)  # the Trainer saves none into checkpoint-N with FSDP on

    # ------------------------------------------------------------------ architecture and tensors

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        found = _common.config_dir(*_common.run_dirs(path, RUN_LEVELS))
        if found is not None:
            arch = _common.config_json_arch(found)
        else:
            arch = _common.model_group_arch(model_cfg, path, "FSDP", "no config.json in it, its checkpoint dir or "
                                                                   "the run's output dir")
        _common.check_shapes(arch.config, self.tensor_specs(path, arch.config), arch.source, path)
        return arch

    def _key_map(self, path: Path) -> dict[str, str]:
        """{HF name: saved key} of the model tensors (accelerate's `model.` prefix and wrapper fragments dropped)."""
        metadata = read_dcp_metadata(path).state_dict_metadata
        keys = [k for k, m in metadata.items() if k.startswith(PREFIX) and hasattr(m, "size")]
        names = {clean_name(k): k for k in keys}
        inner = _common.hf_prefix(names)  # a model saved under its own wrapper attribute (a LightningModule-like)
        return {name[len(inner):]: key for name, key in names.items()}

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]]:
        metadata = read_dcp_metadata(path).state_dict_metadata
        return {name: tuple(metadata[key].size) for name, key in self._key_map(path).items()}

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        metadata = read_dcp_metadata(path).state_dict_metadata
        keys = self._key_map(path)
        raw = read_dcp_tensors(path, {key: metadata[key] for key in keys.values()})
        return {name: raw[key] for name, key in keys.items()}

    def sharded_dcp_prefix(self, path: Path) -> str | None:
        """"model." when every key is `model.` + its HF name (then FSDP/TP ranks read their own shards); a save
        that kept wrapper fragments is read whole and then laid out."""
        return PREFIX if all(key == PREFIX + name for name, key in self._key_map(path).items()) else None

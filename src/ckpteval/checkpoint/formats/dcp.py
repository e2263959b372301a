"""torch.distributed.checkpoint (DCP) dirs whose tensors carry Hugging Face names, in HF layout.

    ckpt=outputs/run/checkpoints/step_300    # .metadata + __*_*.distcp; config.json in the dir or the run dir

Our trainer saves {"model": <HF state dict>, "optim": ..., "rng": ...} (names under "model."); other trainers
save the HF names at the top level. Architecture: config.json in or beside the dir, else the `model` group
(checked against the tensors' shapes before anything is allocated). Read: only the model's tensors, straight
into FSDP/TP shards under `parallel=` (each rank reads its own bytes); optimizer state never.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ckpteval.checkpoint.formats import _common
from ckpteval.checkpoint.formats._dcp import (
    dcp_model_prefix,
    model_keys,
    read_dcp_metadata,
    read_dcp_tensors,
)
from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError

class DCPFormat(CheckpointFormat):
    name = "dcp"
    description = "a DCP dir with Hugging Face tensor names (.metadata + *.distcp)"

    def looks_like(self, path: Path) -> bool:
        return path.is_dir() and ((path / ".metadata").is_file() or any(path.glob("*.distcp")))

    def check_complete(self, path: Path) -> None:
        if not (path / ".metadata").is_file():
            raise CkptEvalError(f"checkpoint {path} is incomplete: no .metadata (still being written, or the save "
                                "crashed)")
        read_dcp_metadata(path)

    def step_tokens(self, path: Path) -> tuple[int | None, int | None]:
        return _common.metadata_step_tokens(path)

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        found = _common.config_dir(path, path.parent)
        if found is not None:
            return _common.config_json_arch(found)
        return _common.model_group_arch(model_cfg, path, "DCP", f"no config.json in or beside {path}")

    def sharded_dcp_prefix(self, path: Path) -> str | None:
        return dcp_model_prefix(read_dcp_metadata(path).state_dict_metadata)

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]]:
        metadata = read_dcp_metadata(path)
        keys = model_keys(metadata, dcp_model_prefix(metadata.state_dict_metadata))
        return {name: tuple(metadata.state_dict_metadata[key].size) for name, key in keys.items()}

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        metadata = read_dcp_metadata(path)
        keys = model_keys(metadata, dcp_model_prefix(metadata.state_dict_metadata))
        raw = read_dcp_tensors(path, {key: metadata.state_dict_metadata[key] for key in keys.values()})
        return {name: raw[key] for name, key in keys.items()}


"""Hugging Face model dirs: `save_pretrained` output, HF Trainer `checkpoint-N` dirs, our trainer's HF saves.

    ckpt=out/checkpoint-30       # config.json + model.safetensors (or sharded + index, or pytorch_model.bin)

Architecture: config.json in the dir (or beside it). Step and tokens: our `ckpteval.json`, else HF Trainer's
`trainer_state.json` (`global_step`, `num_input_tokens_seen`). Read: the weight files only; a Trainer dir's
optimizer.pt, scheduler.pt, rng_state.pth and training_args.bin are never opened.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

from ckpteval.checkpoint.formats import _common
from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError

HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLE = ("model.safetensors", "pytorch_model.bin")
SHARD_RE = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")


def safetensors_header(path: Path) -> dict:
    """The JSON header; raises CkptEvalError when the file is shorter than the header says (a partial copy) or the
    length field is absurd (a corrupt file: reading it would try to allocate that many bytes)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CkptEvalError(f"checkpoint file {path} is corrupt or truncated: its header length field says "
                                    f"{n} bytes but the file has {size}: re-copy or re-save it")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CkptEvalError(f"checkpoint file {path} is unreadable or truncated ({e}): re-copy or re-save it") from None
    if not isinstance(header, dict):
        raise CkptEvalError(f"checkpoint file {path} has no safetensors header: re-copy or re-save it")
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        raise CkptEvalError(f"checkpoint file {path} has a malformed safetensors header: re-copy or re-save it") \
            from None
    if size < 8 + n + end:
        raise CkptEvalError(f"checkpoint file {path} is truncated ({size} bytes, header needs "
                            f"{8 + n + end}): it is still being written, or the copy was cut short")
    return header


def hf_weight_files(ckpt_dir: Path) -> list[Path]:
    """The weight files of an HF dir, checked present (and safetensors checked whole). Raises when incomplete."""
    for index_name in HF_INDEXES:
        index = ckpt_dir / index_name
        if index.is_file():
            weight_map = _common.read_json(index).get("weight_map")
            if not weight_map:
                raise CkptEvalError(f"checkpoint {ckpt_dir} is incomplete: {index_name} has no weight_map "
                                    "(still being written?)")
            files = [ckpt_dir / name for name in dict.fromkeys(weight_map.values())]
            break
    else:
        files = [ckpt_dir / n for n in HF_SINGLE if (ckpt_dir / n).is_file()][:1]
        shards = sorted(p.name for p in ckpt_dir.iterdir() if SHARD_RE.match(p.name))
        if not files and shards:
            raise CkptEvalError(f"checkpoint {ckpt_dir} is incomplete: shards {shards[0]}... but no "
                                f"{HF_INDEXES[0]} (still being written, or the save crashed)")
    for f in files:
        if not f.is_file():
            raise CkptEvalError(f"checkpoint {ckpt_dir} is incomplete: its index names {f.name}, which is missing "
                                "(still being written, or a shard was not copied)")
        if f.suffix == ".safetensors":
            safetensors_header(f)
    return files


class HFFormat(CheckpointFormat):
    name = "hf"
    description = "an HF model dir (config.json + model.safetensors / shards + index / pytorch_model.bin)"

    def looks_like(self, path: Path) -> bool:
        if not path.is_dir():
            return False
        if any((path / n).is_file() for n in HF_INDEXES + HF_SINGLE):
            return True
        return any(SHARD_RE.match(p.name) for p in path.iterdir())

    def check_complete(self, path: Path) -> None:
        if not path.is_dir():
            raise CkptEvalError(f"checkpoint {path} is not a directory: {self.description}")
        if not hf_weight_files(path):
            if (path / "adapter_config.json").is_file():  # a PEFT adapter: no model weights, by design
                raise CkptEvalError(f"checkpoint {path} is a PEFT adapter (adapter_config.json + adapter_model.*), "
                                    "not a whole model: read it with ckpt_format=peft (or leave ckpt_format unset); "
                                    "its base comes from base_model_name_or_path or ckpt_base=PATH")
            raise CkptEvalError(f"checkpoint {path} has no weight files: {self.description}")

    def step_tokens(self, path: Path) -> tuple[int | None, int | None]:
        return _common.metadata_step_tokens(path)

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        found = _common.config_dir(path, path.parent)
        if found is None:
            raise CkptEvalError(f"HF checkpoint {path} has no config.json in or beside it: an HF model dir needs one "
                                "(model.config.save_pretrained(DIR))")
        return _common.config_json_arch(found)

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]]:
        specs: dict[str, tuple[int, ...]] = {}
        for f in hf_weight_files(path):
            if f.suffix == ".safetensors":
                specs.update({k: tuple(v["shape"]) for k, v in safetensors_header(f).items() if k != "__metadata__"})
            else:
                specs.update({k: tuple(v.shape) for k, v in _common.read_tensor_bin(f, mmap=True).items()})
        return specs

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in hf_weight_files(path):
            if f.suffix == ".safetensors":
                try:
                    state.update(load_file(str(f)))
                except (SafetensorError, OSError) as e:
                    raise CkptEvalError(f"checkpoint file {f} is unreadable ({e}): re-copy or re-save it") from None
            else:
                state.update(_common.read_tensor_bin(f))
        return state


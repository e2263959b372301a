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
from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError

# Top-level entries a trainer saves beside "model" in one DCP checkpoint; never model weights.
TRAINER_ENTRIES = {"optim", "optimizer", "optimizers", "scheduler", "lr_scheduler", "lr_schedulers", "dataloader",
                   "train_state", "rng", "extra", "state", "param_groups", "step"}


def read_dcp_metadata(ckpt_dir: Path):
    """DCP `.metadata`, with every storage file it names present and long enough; raises when incomplete."""
    from ckpteval.checkpoint.safe_pickle import load_dcp_metadata

    metadata = load_dcp_metadata(ckpt_dir)  # allow-listed: a crafted .metadata cannot run code
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        f = ckpt_dir / name
        if not f.is_file() or f.stat().st_size < size:
            raise CkptEvalError(f"checkpoint {ckpt_dir} is incomplete: .metadata names {name}, which is "
                                f"{'missing' if not f.is_file() else 'truncated'}")
    return metadata


def dcp_model_prefix(keys) -> str:
    """"model." when the weights sit under a "model" entry (our trainer's {"model": ..., "optim": ...}), "" when
    they are top-level. Top-level HF names also start with "model." (model.layers.0...), so the tell is what
    follows: our layout nests a whole *ForCausalLM state dict (model.model..., model.lm_head...)."""
    keys = list(keys)
    under = [k[len("model."):] for k in keys if k.startswith("model.")]
    if not under:
        return ""
    tops = {k.split(".", 1)[0] for k in keys}
    if tops & TRAINER_ENTRIES:
        return "model."
    if "lm_head" in tops:  # a top-level head beside model.* = top-level HF names
        return ""
    return "model." if any(k.startswith(("model.", "lm_head.", "transformer.")) for k in under) else ""


def model_keys(metadata, prefix: str) -> dict[str, str]:
    """{HF name: DCP key} of the model tensors (trainer entries and non-tensor entries left out)."""
    out = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith(prefix) or not hasattr(meta, "size"):
            continue
        name = key[len(prefix):]
        if prefix or name.split(".", 1)[0] not in TRAINER_ENTRIES:
            out[name] = key
    return out


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
        from ckpteval.checkpoint.formats.hf import metadata_step_tokens

        return metadata_step_tokens(path)

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
        import torch.distributed.checkpoint as dcp

        from ckpteval.checkpoint.safe_pickle import safe_filesystem_reader

        metadata = read_dcp_metadata(path)
        keys = model_keys(metadata, dcp_model_prefix(metadata.state_dict_metadata))
        meta = metadata.state_dict_metadata
        wanted = {key: torch.empty(tuple(meta[key].size), dtype=meta[key].properties.dtype) for key in keys.values()}
        dcp.load(wanted, storage_reader=safe_filesystem_reader(path), no_dist=True)
        return {name: wanted[key] for name, key in keys.items()}


def match_dcp_keys(info, model, state: dict) -> dict[str, str]:
    """{model tensor name: DCP key} for every tensor of `state` (plain or DTensor), checked against the
    checkpoint's metadata: a missing tensor or another shape is one clear error. A tied head that was saved only
    as the embedding is left out (tying fills it). `info` is a CheckpointInfo with `dcp_prefix` set."""
    metadata = read_dcp_metadata(info.path).state_dict_metadata
    prefix = info.dcp_prefix or ""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    keys: dict[str, str] = {}
    for name, tensor in state.items():
        key = prefix + name
        meta = metadata.get(key)
        if meta is None:
            if tied and name.endswith("lm_head.weight"):
                continue
            available = [k for k in metadata if k.startswith(prefix) and "optim" not in k][:3]
            raise CkptEvalError(f"checkpoint {info.path} does not match its architecture from {info.arch_source}: "
                                f"tensor {key} is missing (it holds e.g. {available})")
        shape = tuple(getattr(meta, "size", ()))
        if shape != tuple(tensor.shape):
            raise CkptEvalError(f"checkpoint {info.path} does not match its architecture from {info.arch_source}: "
                                f"tensor shape mismatch for {name}: checkpoint {shape} vs architecture "
                                f"{tuple(tensor.shape)}")
        keys[name] = key
    return keys

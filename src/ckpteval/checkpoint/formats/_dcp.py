"""Reading torch.distributed.checkpoint (DCP) dirs: shared by every family whose checkpoint is one (our trainer's
and HF-named DCP dirs, torchtitan, Megatron-Core, ...).

Everything goes through the allow-listed `.metadata` unpickler (`safe_pickle`), and only the keys asked for
are read: optimizer state in the same `*.distcp` files is never touched.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

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
        f = Path(ckpt_dir) / name
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


def read_dcp_tensors(path: Path, wanted: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The full tensors `wanted` ({DCP key: TensorStorageMetadata}) and nothing else: the load plan only asks
    for these keys, so optimizer state in the same files is never read."""
    import torch.distributed.checkpoint as dcp

    from ckpteval.checkpoint.safe_pickle import safe_filesystem_reader

    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in wanted.items()}
    dcp.load(state, storage_reader=safe_filesystem_reader(path), no_dist=True)
    return state


def read_dcp_object(path: Path, metadata, key: str) -> Any:
    """A small non-tensor entry (e.g. `train_state.step`): its bytes are a torch-saved object, read through the
    allow-listed `torch_load` (torch's own DCP loader would unpickle it with weights_only=False)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from ckpteval.checkpoint.safe_pickle import torch_load

    info = (metadata.storage_data or {}).get(MetadataIndex(key))
    if info is None or getattr(info, "transform_descriptors", None):
        return None
    with open(Path(path) / info.relative_path, "rb") as f:
        f.seek(info.offset)
        data = f.read(info.length)
    with tempfile.NamedTemporaryFile(suffix=".pt") as tmp:
        tmp.write(data)
        tmp.flush()
        return torch_load(tmp.name)


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

"""Writing checkpoints so that they appear complete or not at all.

Every writer fills a hidden sibling temp dir (`.step_300.partial`), then renames it into place: a rename is
atomic on one filesystem, so a watcher or sweep listing `step_*` never sees a half-written checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ckpteval.fsutil import fresh_partial_dir, partial_dir, publish_dir


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_beside(tmp: Path, extra_files: dict[str, str] | None, config, tokenizer) -> None:
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if config is not None:
        config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def save_dcp_atomic(final: Path, state_dict: dict, *, extra_files: dict[str, str] | None = None, config=None,
                    tokenizer=None) -> Path:
    """DCP-save `state_dict` (collective: every rank calls it) with config.json, the tokenizer and extra files
    beside the shards, then publish the dir in one rename."""
    import torch.distributed.checkpoint as dcp

    final = Path(final)
    tmp = partial_dir(final)
    if _is_main():
        fresh_partial_dir(final)
    _barrier()
    dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(str(tmp)))
    if _is_main():
        _write_beside(tmp, extra_files, config, tokenizer)
        publish_dir(tmp, final)
    _barrier()
    return final


def save_hf_atomic(final: Path, model, tokenizer=None, dtype: torch.dtype | None = None,
                   extra_files: dict[str, str] | None = None) -> Path:
    """An HF model dir (config.json + safetensors + tokenizer), published in one rename (rank 0 only)."""
    final = Path(final)
    tmp = fresh_partial_dir(final)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(tmp, safe_serialization=True)
    _write_beside(tmp, extra_files, None, tokenizer)
    publish_dir(tmp, final)
    return final

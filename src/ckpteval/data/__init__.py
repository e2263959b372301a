"""Held-out and training data as token windows, for `data=local|hf|demo` (see `windows.py` for the order)."""

from __future__ import annotations

import torch.distributed as dist

from ckpteval.data.windows import TokenWindows


def load_eval_windows(cfg, tokenizer) -> TokenWindows:
    """The held-out windows every loss evaluation (mode=loss, train_eval, watch) reads."""
    return _load(cfg, tokenizer, split=cfg.data.split, path=cfg.data.dataset_path, seq_len=cfg.eval.seq_len,
                 what="data.dataset_path")


def load_train_windows(cfg, tokenizer) -> TokenWindows:
    return _load(cfg, tokenizer, split=cfg.data.train_split, path=cfg.data.train_path, seq_len=cfg.train.seq_len,
                 what="data.train_path")


def _load(cfg, tokenizer, *, split: str, path: str | None, seq_len: int, what: str) -> TokenWindows:
    if cfg.data.kind == "local":
        from ckpteval.data.local import load_local_windows

        return load_local_windows(path, cfg.data.file_pattern, cfg.data.dtype, seq_len, what)
    if cfg.data.kind == "hf":
        from ckpteval.data.hf import load_hf_windows

        # Rank 0 tokenizes once and broadcasts the packed stream: ranks never disagree, the CPU work is not repeated.
        return _on_rank0(lambda: load_hf_windows(cfg.data, split, tokenizer, seq_len))
    from ckpteval.errors import CkptEvalError

    raise CkptEvalError(f"data.kind={cfg.data.kind!r} is unknown: use data=local, data=hf or data=demo")


def _on_rank0(fn):
    """Run fn on rank 0 and share its result (or its error, so every rank fails together)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # shared, then re-raised on every rank
            box[0] = ("err", e)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "err":
        raise value
    return value

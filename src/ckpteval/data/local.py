"""`data=local`: pre-tokenized shards on disk, memory-mapped (nothing is copied into RAM up front)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ckpteval.data.windows import TokenWindows
from ckpteval.dtypes import token_dtype
from ckpteval.errors import CkptEvalError


def token_files(path: str | None, pattern: str, what: str = "data.dataset_path") -> list[Path]:
    """Files matching `pattern` under `path` (recursive patterns allowed), sorted by path."""
    if not path:
        raise CkptEvalError(f"{what} is not set: point it at a dir of token shards ({what}=DIR)")
    root = Path(path).expanduser()
    if not root.exists():
        raise CkptEvalError(f"{what}={path} does not exist: point it at a dir of token shards")
    if root.is_file():
        return [root]
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        present = sorted(p.name for p in root.iterdir())[:8]
        raise CkptEvalError(f"no files match data.file_pattern='{pattern}' under {root} (it holds {present or 'nothing'}"
                            f"): fix data.file_pattern or {what}")
    return files


def read_tokens(path: Path, dtype: str) -> np.ndarray:
    """A raw little-endian `.bin` token stream (dtype `data.dtype`) or a 1-D `.npy`, memory-mapped."""
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise CkptEvalError(f"{path} holds a {arr.ndim}-D {arr.dtype} array: token shards must be 1-D integers")
        return arr
    np_dtype = token_dtype(dtype)
    size = path.stat().st_size
    if size % np_dtype.itemsize:
        raise CkptEvalError(f"{path} has {size} bytes, not a whole number of {dtype} tokens: is data.dtype right?")
    if size == 0:
        return np.zeros(0, dtype=np_dtype)
    return np.memmap(path, dtype=np_dtype, mode="r")


def load_local_windows(path: str | None, pattern: str, dtype: str, seq_len: int,
                       what: str = "data.dataset_path") -> TokenWindows:
    files = token_files(path, pattern, what)
    windows = TokenWindows([read_tokens(f, dtype) for f in files], seq_len, [str(f) for f in files])
    if len(windows) == 0:
        longest = max(len(a) for a in windows.arrays)
        raise CkptEvalError(f"the {len(files)} file(s) under {what}={path} hold no window of {seq_len + 1} tokens "
                            f"(longest has {longest}): the data is empty or shorter than seq_len={seq_len}")
    return windows

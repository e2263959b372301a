"""Dtype names, one map each: compute dtypes (`eval.dtype`, `train.dtype`, `harness.dtype`, `convert.dtype`,
`parallel.param_dtype` / `reduce_dtype`) to torch dtypes, and token dtypes (`data.dtype`) to numpy ones.

The config's Enums (`config.ComputeDtype`, `config.TokenDtype`) list the same names, so a value from a composed
config always resolves; the error here is for callers that pass a plain string. torch and numpy are imported
when a name is resolved, so the config layer can import this module for free.
"""

from __future__ import annotations

from typing import Any

from ckpteval.errors import CkptEvalError

COMPUTE = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}  # name (or alias) -> torch attribute
TOKEN = ("uint16", "uint32", "int32", "int64")  # raw .bin token streams, little-endian


def _name(value: Any) -> str:
    return str(getattr(value, "value", value))


def torch_dtype(value: Any):
    """A torch dtype for a compute-dtype name (a torch.dtype passes through)."""
    import torch

    if isinstance(value, torch.dtype):
        return value
    name = _name(value)
    if name not in COMPUTE:
        raise CkptEvalError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16")
    return getattr(torch, COMPUTE[name])


def dtype_name(dtype) -> str:
    """`torch.bfloat16` -> "bfloat16" (the name configs and conversion records use)."""
    return str(dtype).removeprefix("torch.")


def token_dtype(value: Any):
    """The little-endian numpy dtype of a raw token stream of `data.dtype` = `value`."""
    import numpy as np

    name = _name(value)
    if name not in TOKEN:
        raise CkptEvalError(f"data.dtype={name} is not a token dtype: use one of {', '.join(TOKEN)}")
    return np.dtype(name).newbyteorder("<")

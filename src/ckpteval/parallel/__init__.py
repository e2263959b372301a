"""Model layouts: one function builds the evaluation model (and its scorer) for `parallel.name`.

`none` is a full replica per rank (plain data parallel when launched by torchrun). fsdp/tp/pp live in their
own modules and are selected here, so modes never branch on the layout.
"""

from __future__ import annotations

import torch
from torch import nn

from ckpteval.errors import CkptEvalError
from ckpteval.evaluation.loss import Scorer, causal_lm_scorer
from ckpteval.parallel.dist import DistContext

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CkptEvalError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16") from None


def load_eval_model(cfg, info, dist: DistContext) -> tuple[nn.Module, Scorer]:
    """Build the model for `cfg.parallel.name`, load the checkpoint's weights into it, return it + its scorer."""
    from ckpteval.checkpoint import load_model

    dtype = resolve_dtype(cfg.eval.dtype)
    if cfg.parallel.name == "none":
        model = load_model(info, cfg.model, device=dist.device, dtype=dtype)
        return model, causal_lm_scorer(model, cfg.eval.logits_chunk)
    raise CkptEvalError(f"parallel={cfg.parallel.name} is not available: use parallel=none")

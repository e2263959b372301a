"""`mode=convert`: a checkpoint of any family (HF, DCP, GGUF, nanoGPT, Lightning, ...) -> a verified HF dir, once.

    python run.py mode=convert ckpt=outputs/.../checkpoints/step_300                          # -> outputs/converted/step_300-<hash>
    python run.py mode=convert ckpt=outputs/.../step_300 convert.out=exports/step_300 convert.dtype=bfloat16
    python run.py mode=convert ckpt=out-shakespeare/ckpt.pt convert.out=exports/nanogpt      # -> GPT2LMHeadModel

The dir holds config.json, model.safetensors and the tokenizer; it appears only after the converted model
reproduced the source's logits within `convert.tolerance` (max abs difference printed). Running it again on
the same, unchanged checkpoint is a no-op.
"""

from __future__ import annotations

import time
from typing import Any

from ckpteval.checkpoint import inspect_configured
from ckpteval.checkpoint.convert import convert_to_hf, default_output, is_converted, read_record
from ckpteval.errors import CkptEvalError


def run(cfg, job) -> dict[str, Any]:
    if job.dist.world_size > 1:
        raise CkptEvalError("mode=convert runs in one process: python run.py mode=convert ckpt=... (no torchrun)")
    info = inspect_configured(cfg)
    job.step = info.step
    out = cfg.convert.out or default_output(info, cfg.paths.outputs)
    start = time.perf_counter()
    reused = is_converted(info, out, cfg.convert.dtype)
    path = convert_to_hf(info, out, cfg.model, cfg.convert.dtype, float(cfg.convert.tolerance))
    record = read_record(path) or {}
    job.run.set_tags({"convert.out": str(path)})
    return {"step": info.step, "tokens_seen": info.tokens_seen, "convert/out": str(path),
            "convert/max_abs_diff": record.get("max_abs_diff"), "convert/reused": int(reused),
            "convert/seconds": time.perf_counter() - start}

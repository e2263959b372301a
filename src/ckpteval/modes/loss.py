"""`mode=loss`: held-out loss and perplexity of one saved checkpoint.

    python run.py mode=loss ckpt=outputs/train_eval/.../checkpoints/step_300 data=demo
    python run.py mode=loss ckpt=PATH data=local data.dataset_path=DIR data.file_pattern='*.bin' eval.steps=100
    python run.py mode=loss ckpt=PATH data=hf data.name=DIR_OR_NAME data.split=validation eval.steps=-1
"""

from __future__ import annotations

from typing import Any

from ckpteval.checkpoint import inspect_checkpoint, load_tokenizer
from ckpteval.data import load_eval_windows
from ckpteval.data.windows import check_token_ids, eval_batches, num_eval_batches
from ckpteval.errors import CkptEvalError
from ckpteval.evaluation.loss import evaluating, run_eval
from ckpteval.parallel import load_eval_model, resolve_dtype


def run(cfg, job) -> dict[str, Any]:
    return evaluate_checkpoint_loss(cfg, job, cfg.ckpt)


def evaluate_checkpoint_loss(cfg, job, ckpt: str) -> dict[str, Any]:
    """The per-checkpoint loss evaluation shared by `mode=loss` and `mode=watch`."""
    info = inspect_checkpoint(ckpt, cfg.tokenizer, cfg.get("ckpt_format"))
    job.step = info.step
    tokenizer = load_tokenizer(info)
    windows = load_eval_windows(cfg, tokenizer)
    model, scorer = load_eval_model(cfg, info, job.dist)
    check_eval_shapes(cfg, model.config)
    check_token_ids(windows, model.config.vocab_size)
    total = num_eval_batches(len(windows), cfg.eval.batch_size, cfg.eval.steps, job.dist.dp_size)
    job.log("evaluating %s (step %s) on %d windows x %d tokens: %d batches of %d", ckpt, info.step, len(windows),
            cfg.eval.seq_len, total, cfg.eval.batch_size)
    batches = eval_batches(windows, cfg.eval.batch_size, cfg.eval.steps, job.dist.dp_rank, job.dist.dp_size)
    with evaluating(model):
        result = run_eval(scorer, batches, device=job.dist.device, dtype=resolve_dtype(cfg.eval.dtype),
                          model_dtype=next(model.parameters()).dtype, group=job.dist.dp_group,
                          progress=job.dist.is_main, total=total)
    return {"step": info.step, "tokens_seen": info.tokens_seen, **result.metrics()}


def check_eval_shapes(cfg, model_config) -> None:
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if max_pos is not None and cfg.eval.seq_len > max_pos:
        raise CkptEvalError(f"eval.seq_len={cfg.eval.seq_len} is beyond the model's {max_pos} positions "
                            f"(max_position_embeddings): use eval.seq_len={max_pos} or less")

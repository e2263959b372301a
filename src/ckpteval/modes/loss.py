"""`mode=loss`: held-out loss, perplexity and bits per byte of one saved checkpoint, on one or more sets.

    python run.py mode=loss ckpt=outputs/train_eval/.../checkpoints/step_300 data=demo
    python run.py mode=loss ckpt=PATH data=local data.dataset_path=DIR data.file_pattern='*.bin' eval.steps=100
    python run.py mode=loss ckpt=PATH data=hf data.name=DIR_OR_NAME data.split=validation eval.steps=-1
    python run.py mode=loss ckpt=PATH data=demo '+eval.sets.code={kind: local, dataset_path: DIR}' \
        '+eval.sets.web={kind: hf, name: DIR_OR_NAME, split: validation, text_field: text}'
    python run.py mode=loss ckpt=PATH data=demo eval_suite=demo        # a ready suite (conf/eval_suite/)

Every set is windowed and batched alike (data/windows.py); the model loads once. Per-window NLL sums of each
set are saved as `window_nll.npz` in the run dir: scans compare checkpoints on the same windows with them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckpteval.checkpoint import inspect_checkpoint, load_tokenizer
from ckpteval.data import EvalSet, check_eval_sets, load_eval_sets
from ckpteval.data.windows import check_token_ids, eval_batches, num_eval_batches
from ckpteval.errors import CkptEvalError
from ckpteval.evaluation.auto_batch import LossBatch, is_auto, loss_batch, resilient_scorer
from ckpteval.evaluation.loss import EvalResult, causal_lm_scorer, document_sep_id, evaluating, run_eval
from ckpteval.evaluation.statistics import WINDOW_FILE
from ckpteval.parallel import load_eval_model, resolve_dtype

log = logging.getLogger("ckpteval")


def run(cfg, job) -> dict[str, Any]:
    return evaluate_checkpoint_loss(cfg, job, cfg.ckpt, window_file=job.out_dir / WINDOW_FILE)


def evaluate_checkpoint_loss(cfg, job, ckpt: str, window_file: Path | None = None) -> dict[str, Any]:
    """The per-checkpoint loss evaluation shared by `mode=loss`, scans and `mode=watch`: every set, one model."""
    check_eval_sets(cfg)
    info = inspect_checkpoint(ckpt, cfg.tokenizer, cfg.get("ckpt_format"))
    job.step = info.step
    tokenizer = load_tokenizer(info)
    sets = load_eval_sets(cfg, tokenizer)  # every data error before the model loads
    model, scorer = load_eval_model(cfg, info, job.dist)
    check_eval_shapes(cfg, model.config)
    for s in sets:
        check_token_ids(s.windows, model.config.vocab_size)
    table = byte_table(tokenizer, model.config.vocab_size, job)
    results: dict[str, EvalResult] = {}
    with evaluating(model):
        for s in sets:
            results[s.name] = evaluate_set(cfg, job, scorer, s, model_dtype=next(model.parameters()).dtype,
                                           table=table, what=f"{ckpt} (step {info.step})",
                                           keep_windows=window_file is not None, model=model)
    if window_file is not None and job.dist.is_main:
        save_window_nll(window_file, results)
    return {"step": info.step, "tokens_seen": info.tokens_seen, **set_metrics(sets, results)}


def evaluate_set(cfg, job, scorer, eval_set: EvalSet, *, model_dtype, table, what: str = "the model",
                 keep_windows: bool = False, progress: bool = True, model=None) -> EvalResult:
    """One set through `run_eval`: the same batches on every path (mode=loss, train_eval, watch).

    `model` (the plain transformers model `scorer` runs) is what `eval.batch_size=auto` probes."""
    d = job.dist
    dtype = resolve_dtype(cfg.eval.dtype)
    batch = _eval_batch(cfg, model, eval_set, d, dtype)
    total = num_eval_batches(len(eval_set.windows), batch.windows, cfg.eval.steps, d.dp_size)
    if progress:
        job.log("evaluating %s on %s: %d windows x %d tokens, %d batches of %d", what, eval_set.name,
                len(eval_set.windows), cfg.eval.seq_len, total, batch.windows)
    if cfg.parallel.name == "none":  # one model per rank: an out-of-memory error splits the batch (auto)
        scorer = resilient_scorer(scorer, batch, d.device)
    batches = eval_batches(eval_set.windows, batch.windows, cfg.eval.steps, d.dp_rank, d.dp_size)
    result = run_eval(scorer, batches, device=d.device, dtype=dtype, model_dtype=model_dtype, group=d.dp_group,
                      progress=progress and d.is_main, total=total, byte_lengths=table, keep_windows=keep_windows)
    if batch.auto:
        result.batch_size = batch.windows
    return result


def _eval_batch(cfg, model, eval_set: EvalSet, dist, dtype) -> LossBatch:
    """`eval.batch_size`, or for auto the probe's answer for this model (probed uncompiled: same memory, no
    compilation for the probe's shapes)."""
    if not is_auto(cfg.eval.batch_size):
        return loss_batch(cfg, None, None, len(eval_set.windows), dist.dp_size, dist.device, dtype)
    if model is None:
        raise CkptEvalError("eval.batch_size=auto needs the model to probe here: set eval.batch_size=N")
    probe_scorer = causal_lm_scorer(model, cfg.eval.logits_chunk, document_sep_id(cfg.eval, model.config))
    return loss_batch(cfg, model, probe_scorer, len(eval_set.windows), dist.dp_size, dist.device, dtype)


def set_metrics(sets: list[EvalSet], results: dict[str, EvalResult]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in sets:
        out.update(results[s.name].metrics(s.prefix))
    return out


def byte_table(tokenizer, vocab_size: int, job) -> torch.Tensor | None:
    """Bytes per token id for bpb, built once per tokenizer; None (and one log line) without a tokenizer."""
    if tokenizer is None:
        job.log("no tokenizer with the checkpoint (pass tokenizer=PATH): eval/bpb is not computed")
        return None
    from ckpteval.data.token_bytes import token_byte_lengths

    return torch.from_numpy(token_byte_lengths(tokenizer, vocab_size))


def save_window_nll(path: Path, results: dict[str, EvalResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{name: r.window_nll for name, r in results.items() if r.window_nll is not None})


def check_eval_shapes(cfg, model_config) -> None:
    from ckpteval.checkpoint.formats._common import position_limit

    max_pos = position_limit(model_config)  # None: no limit (absent, or OLMo-core's -1)
    if max_pos is not None and cfg.eval.seq_len > max_pos:
        raise CkptEvalError(f"eval.seq_len={cfg.eval.seq_len} is beyond the model's {max_pos} positions "
                            f"(max_position_embeddings): use eval.seq_len={max_pos} or less")

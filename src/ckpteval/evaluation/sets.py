"""Held-out sets through `run_eval`: the same windows, batches and metrics for `mode=loss`, the watcher's loss
evaluation and train_eval's in-loop evaluation (which is why `eval/loss` at step N equals `mode=loss` on step_N).

    table = byte_table(tokenizer, model.config.vocab_size, job)       # bytes per token id, for bits per byte
    result = evaluate_set(cfg, job, scorer, eval_set, model_dtype=..., table=table)
    metrics = set_metrics(sets, {s.name: result_of_s ...})           # eval/... and eval/NAME/...
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ckpteval.data import EvalSet
from ckpteval.data.windows import eval_batches, num_eval_batches
from ckpteval.dtypes import torch_dtype
from ckpteval.errors import CkptEvalError
from ckpteval.evaluation.auto_batch import LossBatch, is_auto, loss_batch, resilient_scorer
from ckpteval.evaluation.loss import EvalResult, causal_lm_scorer, document_sep_id, run_eval


def evaluate_set(cfg, job, scorer, eval_set: EvalSet, *, model_dtype, table, what: str = "the model",
                 keep_windows: bool = False, progress: bool = True, results=None, records: bool = True,
                 model=None) -> EvalResult:
    """One set through `run_eval`: the same batches on every path (mode=loss, train_eval, watch). With a result
    store entry (`results`), blocks it holds are read and the rest computed and recorded (evaluation/resume.py):
    the same numbers, bit for bit; `records`: whether this rank writes its blocks. `model` (the plain
    transformers model `scorer` runs) is what `eval.batch_size=auto` probes."""
    d = job.dist
    dtype = torch_dtype(cfg.eval.dtype)
    batch = _eval_batch(cfg, model, eval_set, d, dtype)
    total = num_eval_batches(len(eval_set.windows), batch.windows, cfg.eval.steps, d.dp_size)
    if progress:
        job.log("evaluating %s on %s: %d windows x %d tokens, %d batches of %d", what, eval_set.name,
                len(eval_set.windows), cfg.eval.seq_len, total, batch.windows)
    if cfg.parallel.name == "none":  # one model per rank: an out-of-memory error splits the batch (auto)
        scorer = resilient_scorer(scorer, batch, d.device)
    if results is not None:
        from ckpteval.evaluation.resume import evaluate_windows

        result = evaluate_windows(scorer, eval_set.windows, results, batch_size=batch.windows,
                                  steps=cfg.eval.steps, dist=d, device=d.device, dtype=dtype,
                                  model_dtype=model_dtype, table=table, equal_batches=cfg.parallel.name != "none",
                                  writer=records, progress=progress and d.is_main, keep_windows=keep_windows,
                                  what=f"loss on {eval_set.name}")
    else:
        batches = eval_batches(eval_set.windows, batch.windows, cfg.eval.steps, d.dp_rank, d.dp_size)
        result = run_eval(scorer, batches, device=d.device, dtype=dtype, model_dtype=model_dtype,
                          group=d.dp_group, progress=progress and d.is_main, total=total, byte_lengths=table,
                          keep_windows=keep_windows)
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

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

from ckpteval import startup
from ckpteval.checkpoint import inspect_configured, load_tokenizer
from ckpteval.data import load_eval_sets
from ckpteval.data.windows import check_token_ids
from ckpteval.evaluation.loss import EvalResult, evaluating
from ckpteval.evaluation.sets import byte_table, check_eval_shapes, evaluate_set, save_window_nll, set_metrics
from ckpteval.evaluation.statistics import WINDOW_FILE
from ckpteval.parallel import load_eval_model

log = logging.getLogger("ckpteval")


def run(cfg, job) -> dict[str, Any]:
    return evaluate_checkpoint_loss(cfg, job, cfg.ckpt, window_file=job.out_dir / WINDOW_FILE)


def evaluate_checkpoint_loss(cfg, job, ckpt: str, window_file: Path | None = None) -> dict[str, Any]:
    """The per-checkpoint loss evaluation shared by `mode=loss`, scans and `mode=watch`: every set, one model."""
    startup.evaluation_started()
    info = inspect_configured(cfg, ckpt)
    job.step = info.step
    tokenizer = load_tokenizer(info)
    sets = load_eval_sets(cfg, tokenizer)  # every data error before the model loads
    model, scorer = load_eval_model(cfg, info, job.dist)
    startup.watch_first_request()
    check_eval_shapes(cfg, model.config)
    for s in sets:
        check_token_ids(s.windows, model.config.vocab_size)
    table = byte_table(tokenizer, model.config.vocab_size, job)
    results: dict[str, EvalResult] = {}
    with evaluating(model):
        for s in sets:
            results[s.name] = evaluate_set(cfg, job, scorer, s, model_dtype=next(model.parameters()).dtype,
                                           table=table, what=f"{ckpt} (step {info.step})",
                                           keep_windows=window_file is not None)
    if window_file is not None and job.dist.is_main:
        save_window_nll(window_file, results)
        job.run.log_artifact(window_file)  # mode=compare's paired test reads it back from MLflow
    return {"step": info.step, "tokens_seen": info.tokens_seen, **set_metrics(sets, results), **startup.take()}

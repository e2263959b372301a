"""`mode=loss`: held-out loss, perplexity and bits per byte of one saved checkpoint, on one or more sets.

    python run.py mode=loss ckpt=outputs/train_eval/.../checkpoints/step_300 data=demo
    python run.py mode=loss ckpt=PATH data=local data.dataset_path=DIR data.file_pattern='*.bin' eval.steps=100
    python run.py mode=loss ckpt=PATH data=hf data.name=DIR_OR_NAME data.split=validation eval.steps=-1
    python run.py mode=loss ckpt=PATH data=demo '+eval.sets.code={kind: local, dataset_path: DIR}' \
        '+eval.sets.web={kind: hf, name: DIR_OR_NAME, split: validation, text_field: text}'
    python run.py mode=loss ckpt=PATH data=demo eval_suite=demo        # a ready suite (conf/eval_suite/)

Every set is windowed and batched alike (data/windows.py); the model loads once. Per-window NLL sums of each
set are saved as `window_nll.npz` in the run dir: scans compare checkpoints on the same windows with them.
Every finished batch is kept in the result store (`cache.*`, evaluation/result_store.py): the same command after
a kill computes only the rest, with identical numbers (docs/resume.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ckpteval import startup
from ckpteval.checkpoint import inspect_configured, load_tokenizer
from ckpteval.data import EvalSet, load_eval_sets
from ckpteval.data.windows import check_token_ids
from ckpteval.evaluation.loss import EvalResult, document_sep_id, evaluating
from ckpteval.evaluation.result_store import digest, drop_when_finished, job_entry, model_settings, open_store
from ckpteval.evaluation.sets import byte_table, check_eval_shapes, evaluate_set, save_window_nll, set_metrics
from ckpteval.evaluation.statistics import WINDOW_FILE
from ckpteval.parallel import load_eval_model
from ckpteval.parallel.dist import fail_together

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
    with fail_together("opening the result store"):
        store = open_store(cfg.get("cache"), main=job.dist.is_main)  # a read-only cache.dir: before loading
    model, scorer = load_eval_model(cfg, info, job.dist)
    startup.watch_first_request()
    check_eval_shapes(cfg, model.config)
    for s in sets:
        check_token_ids(s.windows, model.config.vocab_size)
    table = byte_table(tokenizer, model.config.vocab_size, job)
    results: dict[str, EvalResult] = {}
    entries = []
    try:
        with evaluating(model):
            for s in sets:
                entry = None
                if store is not None:
                    entry = job_entry(store, info, loss_settings(cfg, job, model, s, table), job.dist)
                    entries.append(entry)
                    drop_when_finished(job, entry, bool(cfg.cache.keep))
                results[s.name] = evaluate_set(cfg, job, scorer, s, model_dtype=next(model.parameters()).dtype,
                                               table=table, what=f"{ckpt} (step {info.step})",
                                               keep_windows=window_file is not None, results=entry,
                                               records=_records(job.dist), model=model)
    finally:
        for entry in entries:
            entry.close()  # what this rank computed is on disk (a SIGTERM passes here too)
    if window_file is not None and job.dist.is_main:
        save_window_nll(window_file, results)
        job.run.log_artifact(window_file)  # mode=compare's paired test reads it back from MLflow
    return {"step": info.step, "tokens_seen": info.tokens_seen, **set_metrics(sets, results), **startup.take()}


def loss_settings(cfg, job, model, eval_set: EvalSet, table) -> dict:
    """What decides a window's numbers besides the checkpoint and the window: the result store's entry settings
    (not the rank count, batch size or run dir)."""
    dims = job.dist.dims
    return {"kind": "loss", "set": eval_set.name, "dtype": str(cfg.eval.dtype), "device": job.dist.device.type,
            "model": model_settings(model), "tp": dims.tp if dims is not None else 1,
            "param_dtype": cfg.parallel.param_dtype if cfg.parallel.name == "fsdp" else None,
            "doc_sep": document_sep_id(cfg.eval, model.config),
            "bytes": digest(table.tolist()) if table is not None else None}


def _records(d) -> bool:
    """Whether this rank records its blocks: one rank per tensor-parallel group and pipeline (they all hold the
    same numbers)."""
    if d.mesh is None:
        return True
    return d.mesh.get_local_rank("tp") == 0 and d.mesh.get_local_rank("pp") == 0

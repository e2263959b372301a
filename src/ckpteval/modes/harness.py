"""`mode=harness`: lm-evaluation-harness benchmarks of one checkpoint, logged beside its loss.

    python run.py mode=harness ckpt=outputs/.../step_10000                          # default suite (conf/harness)
    python run.py mode=harness ckpt=... harness.tasks=[hellaswag,mmlu] harness.num_fewshot=5 harness.limit=200
    python run.py mode=harness ckpt=... harness.include_path=my_tasks/ harness.tasks=[my_task]
    python run.py mode=harness ckpt=... harness.backend=subprocess                 # stock lm_eval CLI, isolated

Tasks are resolved (names, code-execution policy, offline data) before the checkpoint is loaded. Backends:
`hf` wraps the in-memory model in lm-eval's HFLM, `fast` in our FastLM (same numbers, each shared context run
once), `subprocess` converts the checkpoint once (cached by checkpoint identity) and runs the `lm_eval` CLI on
the HF dir. Every metric goes to MLflow as `harness/{task}/{metric}` at the checkpoint step, with each task's
primary metric and `harness/mean_primary`; lm-eval's results JSON and per-sample logs are run artifacts.
With `fast`, every finished batch is kept in the result store (`cache.*`): the same command after a kill
computes only the rest, with identical results (docs/resume.md).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from ckpteval import startup
from ckpteval.checkpoint import checkpoint_identity, inspect_configured, load_model, load_tokenizer
from ckpteval.dtypes import torch_dtype
from ckpteval.errors import CkptEvalError
from ckpteval.evaluation.harness import (
    build_lm,
    harness_metrics,
    lm_eval_cli_command,
    resolve_tasks,
    results_table,
    run_lm_eval_cli,
    run_simple_evaluate,
    save_results,
)
from ckpteval.evaluation.result_store import drop_when_finished, job_entry, model_settings, open_store
from ckpteval.parallel.dist import fail_together

log = logging.getLogger(__name__)


def run(cfg, job) -> dict[str, Any]:
    return evaluate_checkpoint_harness(cfg, job, cfg.ckpt)


def evaluate_checkpoint_harness(cfg, job, ckpt: str, harness_cfg=None) -> dict[str, Any]:
    """The per-checkpoint harness evaluation shared by `mode=harness` and `mode=watch`.

    `harness_cfg` replaces `cfg.harness` (e.g. the watcher's heavy suite). Returns the flat metrics plus "step"
    and "tokens_seen" (the caller logs them); logs lm-eval's results JSON and samples as artifacts of `job.run`.
    """
    hcfg = harness_cfg if harness_cfg is not None else cfg.harness
    startup.evaluation_started()
    start = time.perf_counter()
    info = inspect_configured(cfg, ckpt)
    job.step = info.step
    _check_setup(cfg, hcfg, job.dist)
    timing: dict[str, float] = {"checkpoint_s": time.perf_counter() - start}
    index_dir = _cache_dir(cfg, hcfg, "task_index_dir", "harness_task_index")
    resolved = resolve_tasks(hcfg, index_dir)  # unknown names, refused code tasks, missing data: fail before loading
    timing["tasks_s"] = time.perf_counter() - start - timing["checkpoint_s"]
    job.log("harness: %d task(s) %s on %s (step %s), backend=%s", len(resolved.leaf_tasks),
            ", ".join(resolved.names), ckpt, info.step, hcfg.backend)
    if hcfg.backend == "subprocess":
        results = _evaluate_subprocess(cfg, hcfg, info, job)
        from ckpteval.evaluation.gold import add_gold_scores_from_samples

        add_gold_scores_from_samples(results, resolved.leaf_tasks, bpb=bool(getattr(hcfg, "bpb", True)))
    else:
        results = _evaluate_in_memory(cfg, hcfg, info, job, resolved, timing)
    elapsed = time.perf_counter() - start
    extra = {"harness/runtime_s": elapsed, **startup.take()}
    if "batch_tokens" in timing:
        extra["harness/batch_tokens"] = timing["batch_tokens"]
    if "forward_s" in timing:  # what is neither loading the weights nor running the model: task work, glue
        extra["harness/overhead_s"] = elapsed - timing["load_s"] - timing["forward_s"]
        job.log("harness: %.2f s = load %.2f s + model forward %.2f s + overhead %.2f s (checkpoint %.2f s, tasks "
                "%.2f s, lm-eval outside the forwards %.2f s, freeing the model %.2f s)%s", elapsed,
                timing["load_s"], timing["forward_s"], extra["harness/overhead_s"], timing["checkpoint_s"],
                timing["tasks_s"], timing["evaluate_s"] - timing["forward_s"], timing["free_s"],
                f"; first request {extra[startup.METRIC]:.2f} s after the job started"
                if startup.METRIC in extra else "")
    if not job.dist.is_main or results is None:
        return {"step": info.step, "tokens_seen": info.tokens_seen}
    print(results_table(results), flush=True)
    metrics, primaries = harness_metrics(results)
    label = _suite_label(resolved.names)
    art_dir = save_results(results, Path(job.out_dir) / "lm_eval" / _ckpt_label(info) / label)
    job.run.log_artifact(art_dir, f"lm_eval/{label}")
    job.run.set_tags({f"harness.primary.{task}": metric for task, metric in primaries.items()})
    return {"step": info.step, "tokens_seen": info.tokens_seen, **metrics, **extra}


def _check_setup(cfg, hcfg, dist) -> None:
    if cfg.parallel.name != "none":
        raise CkptEvalError(f"mode=harness evaluates a whole model per process: use parallel=none (under torchrun "
                            f"with harness.backend=fast for data parallel), not parallel={cfg.parallel.name}")
    if hcfg.backend == "subprocess" and dist.world_size > 1:
        raise CkptEvalError("harness.backend=subprocess runs one lm_eval process: launch without torchrun")
    if hcfg.backend == "hf" and dist.world_size > 1:
        log.warning("harness.backend=hf under torchrun: every rank evaluates every request (use backend=fast to "
                    "split them)")


def _evaluate_in_memory(cfg, hcfg, info, job, resolved, timing: dict) -> dict | None:
    store = None
    if hcfg.backend == "fast":  # FastLM records every finished batch: a killed job's next start resumes
        with fail_together("opening the result store"):
            store = open_store(cfg.get("cache"), main=job.dist.is_main)  # a read-only cache.dir: before loading
    elif cfg.get("cache") is not None and cfg.cache.enabled:
        job.log("harness.backend=%s keeps no result store: a killed job starts over (backend=fast resumes)",
                hcfg.backend)
    start = time.perf_counter()
    tokenizer = load_tokenizer(info, required=True)
    model = load_model(info, cfg.model, device=job.dist.device, dtype=torch_dtype(hcfg.dtype),
                       shared_base=True)  # only read: an adapter's base is loaded once per process
    timing["load_s"] = time.perf_counter() - start
    startup.watch_first_request()
    lm = entry = None
    try:
        lm = build_lm(hcfg.backend, model, tokenizer, hcfg, job.dist)
        if store is not None:
            entry = lm.results = job_entry(store, info, harness_settings(lm, model, tokenizer), job.dist)
            drop_when_finished(job, entry, bool(cfg.cache.keep))
        cache_dir = _cache_dir(cfg, hcfg, "request_cache_dir", "harness_requests")
        results = run_simple_evaluate(lm, resolved, hcfg, request_cache_dir=cache_dir)
        if hasattr(lm, "forward_seconds"):
            timing["forward_s"] = lm.forward_seconds
        if hasattr(lm, "rows_plan"):  # harness.batch_size=auto: what was chosen, in the results
            timing.update(lm.rows_plan.chosen())
        return results
    finally:
        if entry is not None:
            entry.close()  # what this rank computed is on disk (a SIGTERM passes here too)
        timing["evaluate_s"] = time.perf_counter() - start - timing["load_s"]
        alive = weakref.ref(model)
        del lm, model  # the LM holds the model: with both gone its memory is free before the next checkpoint loads
        if alive() is not None:  # kept by a reference cycle: a full collection (it walks every object the
            gc.collect()         # process holds, ~0.3-1 s after lm-eval and transformers) is what frees it
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        timing["free_s"] = time.perf_counter() - start - timing["load_s"] - timing["evaluate_s"]


def _cache_dir(cfg, hcfg, key: str, default: str) -> Path:
    """`harness.<key>`, default <paths.outputs>/<default>."""
    return Path(getattr(hcfg, key, None) or Path(cfg.paths.outputs) / default).expanduser()


def harness_settings(lm, model, tokenizer) -> dict:
    """What decides FastLM's results besides the checkpoint and each request's tokens (the result store's entry
    settings; not the rank count, batch size or run dir)."""
    from ckpteval.evaluation.request_cache import tokenizer_fingerprint

    return {"kind": "harness", "backend": "fast", "dtype": str(lm.compute_dtype), "device": lm.device.type,
            "attention": lm._attn_impl, "model": model_settings(model), "tokenizer": tokenizer_fingerprint(tokenizer)}


def converted_checkpoint(cfg, hcfg, info) -> tuple[Path, Path | None]:
    """(HF dir lm_eval can load, tokenizer override or None). HF checkpoints are used as they are; others are
    converted once into harness.cache_dir (default <paths.outputs>/converted), keyed by checkpoint identity."""
    from ckpteval.checkpoint.convert import convert_to_hf, read_record

    tokenizer = info.tokenizer_path
    if info.format == "hf":
        if tokenizer is None:
            raise CkptEvalError(f"no tokenizer found in or beside {info.path}: pass tokenizer=PATH")
        return info.path, (None if tokenizer == info.path else tokenizer)
    root = Path(hcfg.cache_dir or Path(cfg.paths.outputs) / "converted").expanduser().resolve()
    name = info.path.stem if info.path.is_file() else info.path.name
    identity = checkpoint_identity(info.path)
    out = root / f"{name}-{identity[:16]}-{hcfg.dtype}"
    convert_to_hf(info, out, cfg.model, hcfg.dtype, float(cfg.convert.tolerance))
    for old in root.glob(f"{name}-*-{hcfg.dtype}"):  # older conversions of a since-rewritten checkpoint
        record = read_record(old) or {}
        if old != out and record.get("source_path") == str(info.path) and record.get("source_identity") != identity:
            shutil.rmtree(old, ignore_errors=True)
    if info.tokenizer_path is None:
        raise CkptEvalError(f"no tokenizer found in or beside {info.path}: pass tokenizer=PATH")
    return out, None


def _evaluate_subprocess(cfg, hcfg, info, job) -> dict:
    model_dir, tokenizer = converted_checkpoint(cfg, hcfg, info)
    device = str(job.dist.device)
    with tempfile.TemporaryDirectory(prefix="lm_eval_") as tmp:
        cmd = lm_eval_cli_command(model_dir, hcfg, device, Path(tmp), tokenizer=tokenizer)
        return run_lm_eval_cli(cmd, Path(tmp))


def _suite_label(names: list[str]) -> str:
    label = "+".join(Path(n).stem if n.endswith((".yaml", ".yml")) else n for n in names)
    label = "".join(c if c.isalnum() or c in "_-+." else "_" for c in label)
    if len(label) > 80:
        label = label[:64] + "-" + hashlib.sha1(label.encode()).hexdigest()[:8]
    return label


def _ckpt_label(info) -> str:
    return f"step_{info.step}" if info.step is not None else (info.path.stem if info.path.is_file() else info.path.name)

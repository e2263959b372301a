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
"""

from __future__ import annotations

import gc
import hashlib
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ckpteval.checkpoint import checkpoint_identity, inspect_checkpoint, load_model, load_tokenizer
from ckpteval.errors import CkptEvalError
from ckpteval.evaluation.harness import (
    BACKENDS,
    build_lm,
    harness_metrics,
    lm_eval_cli_command,
    resolve_tasks,
    results_table,
    run_lm_eval_cli,
    run_simple_evaluate,
    save_results,
)
from ckpteval.parallel import resolve_dtype

log = logging.getLogger(__name__)


def run(cfg, job) -> dict[str, Any]:
    return evaluate_checkpoint_harness(cfg, job, cfg.ckpt)


def evaluate_checkpoint_harness(cfg, job, ckpt: str, harness_cfg=None) -> dict[str, Any]:
    """The per-checkpoint harness evaluation shared by `mode=harness` and `mode=watch`.

    `harness_cfg` replaces `cfg.harness` (e.g. the watcher's heavy suite). Returns the flat metrics plus "step"
    and "tokens_seen" (the caller logs them); logs lm-eval's results JSON and samples as artifacts of `job.run`.
    """
    hcfg = harness_cfg if harness_cfg is not None else cfg.harness
    start = time.perf_counter()
    info = inspect_checkpoint(ckpt, cfg.tokenizer, cfg.get("ckpt_format"))
    job.step = info.step
    _check_setup(cfg, hcfg, job.dist)
    resolved = resolve_tasks(hcfg)  # unknown names, refused code tasks, missing data: fail before loading
    job.log("harness: %d task(s) %s on %s (step %s), backend=%s", len(resolved.leaf_tasks),
            ", ".join(resolved.names), ckpt, info.step, hcfg.backend)
    timing: dict[str, float] = {}
    if hcfg.backend == "subprocess":
        results = _evaluate_subprocess(cfg, hcfg, info, job)
    else:
        results = _evaluate_in_memory(cfg, hcfg, info, job, resolved, timing)
    elapsed = time.perf_counter() - start
    extra = {"harness/runtime_s": elapsed}
    if "batch_tokens" in timing:
        extra["harness/batch_tokens"] = timing["batch_tokens"]
    if "forward_s" in timing:  # what is neither loading the weights nor running the model: task work, glue
        extra["harness/overhead_s"] = elapsed - timing["load_s"] - timing["forward_s"]
        job.log("harness: %.2f s = load %.2f s + model forward %.2f s + overhead %.2f s", elapsed,
                timing["load_s"], timing["forward_s"], extra["harness/overhead_s"])
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
    if hcfg.backend not in BACKENDS:
        raise CkptEvalError(f"harness.backend={hcfg.backend} is unknown: use one of {', '.join(BACKENDS)}")
    resolve_dtype(hcfg.dtype)
    if cfg.parallel.name != "none":
        raise CkptEvalError(f"mode=harness evaluates a whole model per process: use parallel=none (under torchrun "
                            f"with harness.backend=fast for data parallel), not parallel={cfg.parallel.name}")
    if hcfg.backend == "subprocess" and dist.world_size > 1:
        raise CkptEvalError("harness.backend=subprocess runs one lm_eval process: launch without torchrun")
    if hcfg.backend == "hf" and dist.world_size > 1:
        log.warning("harness.backend=hf under torchrun: every rank evaluates every request (use backend=fast to "
                    "split them)")


def _evaluate_in_memory(cfg, hcfg, info, job, resolved, timing: dict) -> dict | None:
    start = time.perf_counter()
    tokenizer = load_tokenizer(info, required=True)
    model = load_model(info, cfg.model, device=job.dist.device, dtype=resolve_dtype(hcfg.dtype))
    timing["load_s"] = time.perf_counter() - start
    try:
        lm = build_lm(hcfg.backend, model, tokenizer, hcfg, job.dist)
        cache_dir = Path(getattr(hcfg, "request_cache_dir", None) or Path(cfg.paths.outputs) / "harness_requests")
        cache_dir = cache_dir.expanduser()
        results = run_simple_evaluate(lm, resolved, hcfg, request_cache_dir=cache_dir)
        if hasattr(lm, "forward_seconds"):
            timing["forward_s"] = lm.forward_seconds
        if hasattr(lm, "rows_plan"):  # harness.batch_size=auto: what was chosen, in the results
            timing.update(lm.rows_plan.chosen())
        return results
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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

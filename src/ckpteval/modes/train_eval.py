"""`mode=train_eval`: train a causal LM and evaluate held-out loss every `eval.interval` steps.

    python run.py                                   # the demo: tiny Llama on the stdlib corpus, a few minutes on CPU
    python run.py mode=train_eval model=tiny train.steps=2000 eval.interval=100 eval.steps=20 \
        data=local data.train_path=DIR/train data.dataset_path=DIR/val checkpoint.interval=500
    torchrun --nproc_per_node=2 run.py mode=train_eval parallel=fsdp ...      # or parallel=tp

In-loop evaluation is exactly `mode=loss` on the same model: the same windows, batches and `run_eval`, so the
`eval/loss` logged at step N equals `mode=loss ckpt=.../step_N` afterwards. Checkpoints are DCP `step_{N}` dirs
written atomically, with config.json, the tokenizer and `ckpteval.json` (step, tokens seen, data position,
scheduler) inside, so every other mode can use them directly and `checkpoint.resume=true` continues exactly.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ckpteval.checkpoint import (
    build_model,
    config_from_model_cfg,
    parse_step,
    save_dcp_atomic,
)
from ckpteval.data import load_eval_sets, load_train_windows
from ckpteval.data.windows import check_token_ids, train_batches
from ckpteval.dtypes import torch_dtype
from ckpteval.errors import CkptEvalError
from ckpteval.evaluation.loss import evaluating
from ckpteval.evaluation.sets import byte_table
from ckpteval.training.loop import (
    TrainState,
    build_optimizer,
    build_scheduler,
    optimizer_step,
    rng_state,
    set_rng_state,
)


def run(cfg, job) -> dict[str, Any]:
    tokenizer = _tokenizer(cfg, job)
    model = new_model(cfg.model, cfg.train.seed, job.dist.device)
    train_windows = load_train_windows(cfg, tokenizer)
    eval_sets = load_eval_sets(cfg, tokenizer) if cfg.eval.enabled else None  # `data` + eval.sets, as mode=loss
    for windows in [train_windows] + [s.windows for s in eval_sets or []]:
        check_token_ids(windows, model.config.vocab_size)
    model = _parallelize(model, cfg, job)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else job.out_dir / "checkpoints"
    state = _resume(cfg, job, model, optimizer, scheduler, ckpt_dir) if cfg.checkpoint.resume else TrainState()
    job.log("training %s params for %d steps (batch %d x %d tokens x accum %d x dp %d), checkpoints in %s",
            f"{sum(p.numel() for p in model.parameters()):,}", cfg.train.steps, cfg.train.batch_size,
            cfg.train.seq_len, cfg.train.grad_accum, job.dist.dp_size, ckpt_dir)
    result = _train(cfg, job, model, tokenizer, optimizer, scheduler, state, train_windows, eval_sets, ckpt_dir)
    if job.dist.is_main:
        _print_next_steps(cfg, ckpt_dir, state.step)
    return result


def new_model(model_cfg, seed: int, device: torch.device) -> torch.nn.Module:
    """A freshly initialised HF causal LM from the `model` group, seeded so runs are reproducible."""
    torch.manual_seed(seed)
    return build_model(config_from_model_cfg(model_cfg), device="cpu").to(device)


def _tokenizer(cfg, job):
    """The tokenizer saved beside every checkpoint: the demo corpus's own, or `tokenizer=PATH`."""
    from transformers import AutoTokenizer

    path = cfg.tokenizer
    if cfg.data.demo:
        from ckpteval.data.prepare import ensure_demo_corpus

        if job.dist.is_main:
            corpus = ensure_demo_corpus(cfg.paths, cfg.prepare)
            if corpus.vocab_size > cfg.model.vocab_size:
                raise CkptEvalError(f"the demo tokenizer has {corpus.vocab_size} tokens but model.vocab_size="
                                    f"{cfg.model.vocab_size}: set model.vocab_size={corpus.vocab_size}")
        if job.dist.distributed:
            dist.barrier()
        path = path or str(Path(cfg.paths.demo_data) / "tokenizer")
    return AutoTokenizer.from_pretrained(path) if path else None


def _parallelize(model, cfg, job):
    if cfg.parallel.name != "none":
        from ckpteval.parallel import parallelize_for_training

        return parallelize_for_training(model, cfg, job.dist)
    if job.dist.distributed:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[job.dist.device.index] if job.dist.device.type == "cuda"
                                       else None)
    return model


def _unwrap(model):
    return getattr(model, "module", model)


def _train(cfg, job, model, tokenizer, optimizer, scheduler, state, train_windows, eval_sets, ckpt_dir):
    tcfg, d = cfg.train, job.dist
    per_micro = tcfg.batch_size * d.dp_size  # samples consumed per micro-batch across data-parallel ranks
    stream = train_batches(train_windows, tcfg.batch_size, tcfg.seed, state.data_position, d.dp_rank, d.dp_size)
    autocast = torch_dtype(tcfg.dtype) if tcfg.dtype != "float32" else None
    last_eval: dict[str, float] = {}
    table = byte_table(tokenizer, _unwrap(model).config.vocab_size, job) if eval_sets else None
    t0, tokens0, step0 = time.perf_counter(), state.tokens_seen, state.step
    model.train()
    while state.step < tcfg.steps:
        loss, grad_norm = optimizer_step(model, optimizer, scheduler, stream, tcfg.grad_accum, device=d.device,
                                         autocast_dtype=autocast, grad_clip=tcfg.grad_clip)
        state.step += 1
        state.data_position += per_micro * tcfg.grad_accum
        state.tokens_seen += per_micro * tcfg.grad_accum * tcfg.seq_len
        last = state.step == tcfg.steps
        if state.step % tcfg.log_interval == 0 or last:
            loss = _mean_across(loss, d)
            rate = (state.tokens_seen - tokens0) / max(time.perf_counter() - t0, 1e-9)
            metrics = {"train/loss": loss, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
                       "train/tokens_per_s": rate, "train/tokens_seen": state.tokens_seen}
            job.run.log_metrics(metrics, step=state.step)
            if d.is_main:
                print(f"[step {state.step}] train/loss={loss:.4f} | lr={metrics['train/lr']:.2e} | "
                      f"tokens/s={rate:,.0f} | eta {_eta(time.perf_counter() - t0, state.step - step0, tcfg.steps - state.step)}",
                      flush=True)
        if eval_sets is not None and (state.step % cfg.eval.interval == 0 or last):
            last_eval = evaluate(cfg, job, model, eval_sets, table)
            job.run.log_metrics(last_eval, step=state.step)
            if d.is_main:
                print(f"[step {state.step}] eval/loss={last_eval['eval/loss']:.4f} | "
                      f"eval/perplexity={last_eval['eval/perplexity']:.4f}", flush=True)
                extra = [f"{k}={v:.4f}" for k, v in last_eval.items() if k.count("/") == 2 and k.endswith("/loss")]
                if extra:  # eval.sets: one more line, the `data` line keeps its format
                    print(f"[step {state.step}] " + " | ".join(extra), flush=True)
        interval = cfg.checkpoint.interval
        if last or (interval > 0 and state.step % interval == 0):
            save_checkpoint(cfg, job, model, optimizer, scheduler, state, tokenizer, ckpt_dir)
    job.step = state.step
    return {"step": state.step, "tokens_seen": state.tokens_seen, **last_eval}


def evaluate(cfg, job, model, eval_sets, table=None) -> dict[str, float]:
    """The same evaluation `mode=loss` runs: same sets, windows, batches, byte table and `run_eval`."""
    from ckpteval.evaluation.loss import document_sep_id
    from ckpteval.evaluation.sets import evaluate_set, set_metrics
    from ckpteval.parallel import training_scorer

    core = _unwrap(model)
    with evaluating(model):
        scorer = training_scorer(model, cfg.eval.logits_chunk, document_sep_id(cfg.eval, core.config))
        results = {s.name: evaluate_set(cfg, job, scorer, s, model_dtype=next(core.parameters()).dtype, table=table,
                                        progress=False, model=core) for s in eval_sets}
    return set_metrics(eval_sets, results)


def _mean_across(value: float, d) -> float:
    if not d.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t, group=d.dp_group)
    return t.item() / d.dp_size


def save_checkpoint(cfg, job, model, optimizer, scheduler, state: TrainState, tokenizer, ckpt_dir: Path) -> Path:
    """DCP `step_{N}`: model + optimizer + RNG as tensors; step, data position and scheduler in ckpteval.json."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(_unwrap(model), optimizer)
    meta = {**state.to_dict(), "scheduler": scheduler.state_dict(), "seed": cfg.train.seed}
    step_dir = ckpt_dir / f"step_{state.step}"
    save_dcp_atomic(step_dir, {"model": model_sd, "optim": optim_sd, "rng": rng_state()},
                    extra_files={"ckpteval.json": json.dumps(meta, indent=2)}, config=_unwrap(model).config,
                    tokenizer=tokenizer)
    job.log("saved checkpoint %s", step_dir)
    if job.dist.is_main and cfg.checkpoint.keep_last > 0:
        for old in _complete_steps(ckpt_dir)[:-cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return step_dir


def _complete_steps(ckpt_dir: Path) -> list[Path]:
    from glob import escape

    from ckpteval.checkpoint.listing import entry_complete, list_checkpoints

    found = [Path(e.path) for e in list_checkpoints(escape(str(ckpt_dir)) + "/step_*")
             if e.is_dir and entry_complete(e)[0]]
    return sorted(found, key=lambda p: parse_step(p.name) or -1)


def _resume(cfg, job, model, optimizer, scheduler, ckpt_dir: Path) -> TrainState:
    """Load the newest complete checkpoint: model, optimizer, RNG, scheduler and data position."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    steps = _complete_steps(ckpt_dir)
    if not steps:
        job.log("checkpoint.resume=true but no complete step_N in %s: starting from scratch", ckpt_dir)
        return TrainState()
    path = steps[-1]
    model_sd, optim_sd = get_state_dict(_unwrap(model), optimizer)
    state_dict = {"model": model_sd, "optim": optim_sd, "rng": rng_state()}
    dcp.load(state_dict, checkpoint_id=str(path))
    set_state_dict(_unwrap(model), optimizer, model_state_dict=state_dict["model"],
                   optim_state_dict=state_dict["optim"])
    set_rng_state(state_dict["rng"])
    meta = json.loads((path / "ckpteval.json").read_text())
    scheduler.load_state_dict(meta["scheduler"])
    job.log("resumed from %s (step %d)", path, meta["step"])
    return TrainState(step=meta["step"], tokens_seen=meta["tokens_seen"], data_position=meta["data_position"])


def _eta(elapsed_s: float, steps_done: int, steps_left: int) -> str:
    """Time left at this session's pace (evaluations and checkpoints included), as h:mm:ss."""
    if steps_done <= 0:
        return "?"
    left = int(round(elapsed_s / steps_done * steps_left))
    return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"


def next_steps(cfg, ckpt_dir: Path, step: int) -> list[str]:
    """Commands that evaluate the checkpoint just written, each runnable offline exactly as printed."""
    import shlex

    ckpt = shlex.quote(str((ckpt_dir / f"step_{step}").resolve()))
    if cfg.data.demo:
        data = f"data=demo paths.demo_data={shlex.quote(str(Path(cfg.paths.demo_data).resolve()))}"
    elif cfg.data.kind == "hf":
        data = f"data=hf data.name={shlex.quote(str(cfg.data.name))} data.split={cfg.data.split}"
    else:
        data = f"data=local data.dataset_path={shlex.quote(str(Path(cfg.data.dataset_path).resolve()))}"
    tok = f" tokenizer={shlex.quote(str(cfg.tokenizer))}" if cfg.tokenizer else ""
    cmds = [f"python run.py mode=loss ckpt={ckpt} {data}{tok} eval.seq_len={cfg.eval.seq_len}"]
    # the bundled offline suite (conf/harness/offline.yaml, package data): runs with no network, from any dir
    cmds.append(f"python run.py mode=harness ckpt={ckpt}{tok} harness=offline")
    return cmds


def _print_next_steps(cfg, ckpt_dir: Path, step: int) -> None:
    cmds = next_steps(cfg, ckpt_dir, step)
    notes = ["# loss of the checkpoint just written", "# downstream benchmarks (the bundled offline suite)"]
    print("\nNext:\n" + "".join(f"  {c}    {n}\n" for c, n in zip(cmds, notes)), flush=True)

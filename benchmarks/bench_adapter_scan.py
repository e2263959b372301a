"""Adapter-scan benchmark: a 10-checkpoint LoRA run evaluated as one `-m` scan (the base loaded once, adapters
swapped) against 10 separate jobs, for held-out loss and for the harness, whole processes, wall clock.

    python benchmarks/bench_adapter_scan.py                    # ~85M Llama base, 10 LoRA checkpoints, loss + harness
    python benchmarks/bench_adapter_scan.py --size tiny --n 4  # a smoke run

The run: a random-weight Llama base saved as an HF dir (its tokenizer has one token per embedding row, so lm-eval's
`peft=` route does not resize it) and N `checkpoint-K` dirs, each a LoRA adapter (r=16, all linear layers, random
A and B) saved by PEFT's own `save_pretrained`, with the HF Trainer's `trainer_state.json` beside it.

- loss: ours is one `python run.py -m mode=loss ckpt='glob:RUN/checkpoint-*'` (every job in one process: the base
  is loaded once, each adapter merged into it and undone); separate is N `python run.py mode=loss
  ckpt=RUN/checkpoint-K` processes, each loading the base and the adapter. eval/loss must be identical.
- harness: ours is one `run.py -m mode=harness` scan (fast backend); stock is N `lm_eval --model hf --model_args
  pretrained=BASE,peft=RUN/checkpoint-K` runs on the same local tasks (src/ckpteval/tasks), every metric checked (merged
  weights vs the adapter on top: float32 rounding apart; perplexities compared as logs).

Each scan runs in a timed child (the timers of bench_harness.py: exclusive wall-clock time per function, a job's
cycle running from the end of the previous job to the end of its own). Per checkpoint: cycle = compute (the
model's forwards: `run_eval` for loss, FastLM's forwards and vocabulary projection for the harness) + the cost
beyond compute, of which the adapter's own read (`peft.read_tensors`) is shown apart; the target is <= 0.5 s
beyond compute plus that read, for every checkpoint after the first (the first one loads the base).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_harness as bh  # its timed child and process helpers

TASKS = bh.TASKS
TASKS_DIR = bh.TASKS_DIR
SIZES = {  # vocab_size = the tokenizer's length (set at build time)
    "tiny": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512},
    "base": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_key_value_heads": 12, "max_position_embeddings": 1024},
}
COMPUTE = "compute"
READ = "adapter: read tensors"
TIMERS = [
    ("hydra: compose job config", "hydra._internal.config_loader_impl", "ConfigLoaderImpl.load_sweep_config"),
    ("hydra: compose job config", "ckpteval.scan.compose", "ReusedComposition.load_sweep_config"),
    ("hydra: job setup/teardown", "hydra.core.utils", "run_job"),
    ("ckpteval: job glue", "ckpteval.app", "main"),
    ("checkpoint: inspect (adapter + base)", "ckpteval.modes.loss", "inspect_configured"),
    ("checkpoint: inspect (adapter + base)", "ckpteval.modes.harness", "inspect_configured"),
    ("data: windows", "ckpteval.modes.loss", "load_eval_sets"),
    ("tokenizer", "ckpteval.modes.loss", "load_tokenizer"),
    ("tokenizer", "ckpteval.modes.harness", "load_tokenizer"),
    ("base: load (first job)", "ckpteval.checkpoint.load", "validated_model"),
    ("base: load (first job)", "ckpteval.checkpoint.load", "load_weights"),
    ("adapter: check vs base (meta)", "ckpteval.checkpoint.formats.peft", "PeftFormat.adapted_architecture"),
    ("adapter: merge (PEFT)", "ckpteval.checkpoint.formats.peft", "PeftFormat.apply"),
    ("adapter: undo previous", "ckpteval.checkpoint.formats.peft", "_Restore.__call__"),
    (READ, "ckpteval.checkpoint.formats.peft", "read_tensors"),
    ("checkpoint identity (base files)", "ckpteval.checkpoint.detect", "checkpoint_identity"),
    (COMPUTE, "ckpteval.modes.loss", "evaluate_set"),
    (COMPUTE, "ckpteval.evaluation.fast_lm", "FastLM.forward"),
    (COMPUTE, "ckpteval.evaluation.fast_lm", "FastLM._token_scores"),
    ("FastLM: outside forwards", "ckpteval.evaluation.fast_lm", "FastLM.loglikelihood"),
    ("FastLM: outside forwards", "ckpteval.evaluation.fast_lm", "FastLM.loglikelihood_rolling"),
    ("lm-eval: simple_evaluate (rest)", "lm_eval", "simple_evaluate"),
    ("harness: resolve tasks", "ckpteval.modes.harness", "resolve_tasks"),
    ("mlflow: open run", "ckpteval.tracking.run", "open_run"),
    ("mlflow: params", "ckpteval.tracking.run", "Run.log_params"),
    ("mlflow: metrics, tags", "ckpteval.tracking.run", "Run.log_metrics"),
    ("mlflow: metrics, tags", "ckpteval.tracking.run", "Run.set_tags"),
    ("mlflow: artifacts", "ckpteval.tracking.run", "Run.log_artifact"),
    ("mlflow: end run", "ckpteval.tracking.run", "Run.end"),
    ("results: table, files", "ckpteval.results", "report"),
    ("results: table, files", "ckpteval.results", "publish"),
    ("gc.collect", "gc", "collect"),
]


def make_run(root: Path, size: str, n: int) -> tuple[Path, Path, Path]:
    """(base dir, run dir holding checkpoint-1..n, token shards dir)."""
    import numpy as np
    import peft
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.factories import make_tokenizer

    tok = AutoTokenizer.from_pretrained(make_tokenizer(root / "tokenizer", vocab_size=2048))
    vocab = len(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size], vocab_size=vocab, tie_word_embeddings=False, bos_token_id=0,
                                         eos_token_id=0))
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    params = sum(p.numel() for p in model.parameters())
    run = root / "run"
    for k in range(1, n + 1):
        torch.manual_seed(k)
        wrapped = peft.get_peft_model(
            LlamaForCausalLM.from_pretrained(base),
            peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear",
                            init_lora_weights=False))
        ckpt = run / f"checkpoint-{100 * k}"
        wrapped.save_pretrained(ckpt)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 100 * k}))
    shards = root / "shards"
    shards.mkdir()
    np.random.default_rng(0).integers(0, vocab, size=40_000).astype(np.uint16).tofile(shards / "val_000.bin")
    adapter_mb = sum(f.stat().st_size for f in (run / "checkpoint-100").iterdir()) / 1e6
    print(f"base: Llama {params / 1e6:.0f}M params ({size}), vocab {vocab}; {n} LoRA adapters (r=16, all linear "
          f"layers, {adapter_mb:.1f} MB each)")
    return base, run, shards


def cycles_table(cycles: list[dict], title: str) -> tuple[list[str], list[float]]:
    """Lines per checkpoint: cycle = compute + beyond compute (adapter read), and what the rest is."""
    header = (f"  {'ckpt':>4}  {'cycle s':>8}  {'compute s':>9}  {'beyond s':>8}  {'adapter read s':>14}  "
              f"{'beyond - read s':>15}")
    lines = [title, header]
    beyond_minus_read = []
    for i, c in enumerate(cycles, 1):
        beyond = c["cycle"] - c.get(COMPUTE, 0.0)
        read = c.get(READ, 0.0)
        beyond_minus_read.append(beyond - read)
        lines.append(f"  {i:>4}  {c['cycle']:8.2f}  {c.get(COMPUTE, 0.0):9.2f}  {beyond:8.2f}  {read:14.3f}  "
                     f"{beyond - read:15.2f}")
    rest = cycles[1:] or cycles
    buckets: dict[str, float] = {}
    for c in rest:
        for k, v in c.items():
            if k not in ("cycle", COMPUTE):
                buckets[k] = buckets.get(k, 0.0) + v / len(rest)
    mean_beyond = sum(c["cycle"] - c.get(COMPUTE, 0.0) for c in rest) / len(rest)
    buckets["other (no timer)"] = mean_beyond - sum(buckets.values())
    lines.append(f"  beyond compute, mean of checkpoints 2..{len(cycles)}, largest first:")
    lines += [f"    {v:6.3f} s  {k}" for k, v in sorted(buckets.items(), key=lambda kv: -kv[1]) if v >= 0.001]
    return lines, beyond_minus_read


def timed_scan(tmp: Path, name: str, args: list[str], env: dict) -> tuple[float, list[dict], list[dict]]:
    """One `run.py -m ARGS` in a timed child: (wall s, per-job cycles, per-job results.json sorted by step)."""
    sweep = tmp / f"sweep_{name}"
    cycles_file = tmp / f"cycles_{name}.json"
    t, _ = bh.timed([sys.executable, str(Path(__file__).resolve()), "--timed-child", str(cycles_file), "--",
                     str(ROOT / "run.py"), "-m", *args, f"hydra.sweep.dir={sweep}"], tmp, env)
    jobs = sorted((json.loads(p.read_text()) for p in sweep.rglob("results.json") if p.parent.parent == sweep),
                  key=lambda r: r["step"])
    return t, json.loads(cycles_file.read_text()), jobs


def same_metric(key: str, got: float, want: float) -> bool:
    if "perplexity" in key:
        return abs(math.log(got) - math.log(want)) < 1e-5
    return abs(got - want) <= max(1e-6 * abs(want), 1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--n", type=int, default=10, help="checkpoints in the run")
    parser.add_argument("--device", default="cuda" if shutil.which("nvidia-smi") else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--loss-steps", type=int, default=2, help="eval.steps of each loss job (batch 4 x 256)")
    parser.add_argument("--harness-limit", type=int, default=8)
    parser.add_argument("--only", choices=["loss", "harness"], help="run one half")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--timed-child", metavar="OUT", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.timed_child:
        bh.TIMERS = TIMERS
        bh.NOT_OVERHEAD = (COMPUTE,)
        return bh._timed_child(args.timed_child, rest[1:] if rest[:1] == ["--"] else rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    tmp = Path(tempfile.mkdtemp(prefix="bench_adapter_scan_"))
    report: list[str] = []
    try:
        base, run, shards = make_run(tmp, args.size, args.n)
        ckpts = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        common = [f"eval.device={args.device}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
                  f"paths.outputs={tmp / 'out'}"]
        if args.only != "harness":
            loss_args = ["mode=loss", "data=local", f"data.dataset_path={shards}", "eval.seq_len=256",
                         "eval.batch_size=4", f"eval.steps={args.loss_steps}", f"eval.dtype={args.dtype}", *common]
            t_scan, cycles, jobs = timed_scan(tmp, "loss", [f"ckpt=glob:{run}/checkpoint-*", *loss_args], env)
            t_sep, separate = 0.0, []
            for k, ckpt in enumerate(ckpts):
                t, proc = bh.timed([sys.executable, str(ROOT / "run.py"), f"ckpt={ckpt}", *loss_args,
                                    f"hydra.run.dir={tmp / 'loss_sep' / str(k)}"], tmp, env)
                t_sep += t
                separate.append(bh.last_json(proc.stdout))
            same = len(jobs) == len(separate) and all(a["eval/loss"] == b["eval/loss"] for a, b in zip(jobs, separate))
            lines, extra = cycles_table(cycles, f"loss scan ({args.n} checkpoints, eval.steps={args.loss_steps} x 4 x "
                                                f"256 tokens, {args.dtype}, {args.device}):")
            report += lines
            report.append(f"  wall clock: one scan {t_scan:.1f} s vs {args.n} separate jobs {t_sep:.1f} s -> "
                          f"{t_sep / t_scan:.2f}x; eval/loss identical to the separate jobs: "
                          f"{'yes' if same else 'NO'}; beyond compute - adapter read, checkpoints 2..N: max "
                          f"{max(extra[1:] or extra):.2f} s (target <= 0.5 s)")
        if args.only != "loss":
            harness_args = ["mode=harness", "harness=offline", f"harness.include_path={TASKS_DIR}",
                            f"harness.tasks=[{','.join(TASKS)}]", f"harness.limit={args.harness_limit}",
                            "harness.batch_size=8", f"harness.dtype={args.dtype}", *common]
            t_scan, cycles, jobs = timed_scan(tmp, "harness", [f"ckpt=glob:{run}/checkpoint-*", *harness_args], env)
            t_stock, stock = 0.0, []
            for k, ckpt in enumerate(ckpts):
                t, _ = bh.timed([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                                 f"pretrained={base},peft={ckpt},dtype={args.dtype}", "--tasks", ",".join(TASKS),
                                 "--include_path", str(TASKS_DIR), "--batch_size", "8", "--device", args.device,
                                 "--limit", str(args.harness_limit), "--output_path", str(tmp / "stock" / str(k)),
                                 "--seed", "1234,1234,1234,1234"], tmp, env)
                t_stock += t
                stock.append(bh.stock_metrics(tmp / "stock" / str(k)))
            bad = [f"{j['step']}:{key}" for j, ref in zip(jobs, stock) for key, v in ref.items()
                   if not same_metric(key, j[key], v)]
            status = "OK" if len(jobs) == len(stock) and not bad else f"MISMATCH {bad[:3]}"
            lines, extra = cycles_table(cycles, f"harness scan ({args.n} checkpoints, {','.join(TASKS)}, limit "
                                                f"{args.harness_limit}, fast backend, {args.dtype}, {args.device}):")
            report += lines
            report.append(f"  wall clock: one scan {t_scan:.1f} s vs {args.n} stock lm_eval --model hf "
                          f"pretrained=BASE,peft=ADAPTER runs {t_stock:.1f} s -> {t_stock / t_scan:.2f}x; metrics vs "
                          f"stock: [{status}]; beyond compute - adapter read, checkpoints 2..N: max "
                          f"{max(extra[1:] or extra):.2f} s (target <= 0.5 s)")
        print("\n".join(report), flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

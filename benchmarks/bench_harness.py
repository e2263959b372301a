"""Harness-path benchmark: `python run.py mode=harness` on a DCP checkpoint vs the stock route (convert to an HF
dir, then the `lm_eval` CLI on it), whole processes, wall clock, same tasks, same numbers.

    python benchmarks/bench_harness.py                       # tiny Llama, the project's offline tasks
    python benchmarks/bench_harness.py --size small --backends hf,fast --batch-size 16

The checkpoint is a random-weight Llama saved as a trainer-style DCP dir ({"model", "optim"} + config.json +
tokenizer). Tasks: src/ckpteval/tasks (ckpteval_mc: multiple choice, ckpteval_rolling: loglikelihood_rolling), which
run offline. "ours" is one process: resolve tasks (include path only, no built-in task index), load the DCP
weights in memory, evaluate. "stock" is what one does without ckpteval: `run.py mode=convert` (DCP -> HF, written
and verified) and then `lm_eval --model hf --model_args pretrained=DIR ... --include_path src/ckpteval/tasks`. Every
metric of every run is checked equal to the stock run's (exactly for hf; FastLM within 1e-4 relative).

    python benchmarks/bench_harness.py --scan 10             # + a 10-checkpoint scan: one `run.py -m` vs 10 stock runs

`--scan N` writes N HF checkpoints (step_1 .. step_N, different random weights, one tokenizer) and times one
`python run.py -m mode=harness ckpt='glob:.../step_*'` (jobs one after another in one process: tasks resolved,
requests built and tokenized once) against N runs of the stock `lm_eval` CLI, one per checkpoint, every metric
checked against the stock run's. The scan logs to an sqlite MLflow store as a default scan does
(`--no-scan-tracking`: tracking.enabled=false). Printed: both wall clocks, the ratio, and the time per checkpoint
beyond loading and model forwards, measured on the whole job cycle (from the end of the previous job to the end
of this one: Hydra composing the job's config, the MLflow run, lm-eval's own work, results files, everything):
cycle = load (tokenizer + model: `harness/runtime_s`'s load part) + forward (time inside `FastLM.forward`, the
model's forward passes, and the vocabulary projection in `FastLM._token_scores`) + overhead (all the rest, the log-softmax of the logits included), first checkpoint and
the mean of the others, and the largest overhead items (see TIMERS).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

TASKS = ["ckpteval_mc", "ckpteval_rolling"]
TASKS_DIR = ROOT / "src" / "ckpteval" / "tasks"  # the offline tasks (package data)
SIZES = {
    "tiny": {"vocab_size": 4096, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512},
    "small": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 2048},
}


def make_checkpoint(root: Path, size: str) -> Path:
    """A random-weight Llama as a DCP step dir with config.json and a BPE tokenizer beside the shards."""
    import torch
    import torch.distributed.checkpoint as dcp
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.factories import make_tokenizer

    tok_dir = make_tokenizer(root / "tokenizer", vocab_size=min(SIZES[size]["vocab_size"], 2048))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size], tie_word_embeddings=False, bos_token_id=0, eos_token_id=0))
    ckpt = root / "run" / "step_1000"
    dcp.save({"model": model.state_dict(), "optim": {"step": torch.tensor(1000)}},
             storage_writer=dcp.FileSystemWriter(str(ckpt)), no_dist=True)
    model.config.save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(ckpt)
    return ckpt


def make_hf_checkpoints(root: Path, size: str, n: int) -> list[Path]:
    """`n` random-weight Llamas as HF dirs step_1..step_n sharing one BPE tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.factories import make_tokenizer

    tok = AutoTokenizer.from_pretrained(make_tokenizer(root / "tokenizer",
                                                       vocab_size=min(SIZES[size]["vocab_size"], 2048)))
    out = []
    for k in range(1, n + 1):
        torch.manual_seed(k)
        model = LlamaForCausalLM(LlamaConfig(**SIZES[size], tie_word_embeddings=False, bos_token_id=0,
                                             eos_token_id=0))
        path = root / "scan" / f"step_{k}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out.append(path)
    return out


# ------------------------------------------------------------------------------------------ scan accounting
# `--timed-child OUT -- RUN.PY ARGS` runs `run.py -m ...` in this process with wall-clock timers on the
# functions a harness job spends its time in (no profiler: each timer costs microseconds). Time is exclusive:
# a timed call inside another one (a forward inside FastLM.loglikelihood) counts only in its own bucket. A
# checkpoint's cycle runs from the end of the previous job to the end of its own, so the launcher's work between
# jobs (composing the next job's config) belongs to the job it prepares; whatever no timer covers is "other".

# (bucket, module, attribute path): what each timer wraps. "load" and "forward" are what the target excludes.
TIMERS = [
    ("hydra: compose job config", "hydra._internal.config_loader_impl", "ConfigLoaderImpl.load_sweep_config"),
    ("hydra: compose job config", "ckpteval.scan.compose", "ReusedComposition.load_sweep_config"),
    ("hydra: job setup/teardown", "hydra.core.utils", "run_job"),
    ("ckpteval: job glue", "ckpteval.app", "main"),
    ("checkpoint: inspect", "ckpteval.modes.harness", "inspect_configured"),
    ("load", "ckpteval.modes.harness", "load_tokenizer"),
    ("load", "ckpteval.modes.harness", "load_model"),
    ("forward", "ckpteval.evaluation.fast_lm", "FastLM.forward"),
    # the vocabulary projection of plain heads (model compute) runs in _token_scores; its log-softmax stays
    # in its own bucket below and counts as overhead
    ("forward", "ckpteval.evaluation.fast_lm", "FastLM._token_scores"),
    ("FastLM: outside forwards", "ckpteval.evaluation.fast_lm", "FastLM.loglikelihood"),
    ("FastLM: outside forwards", "ckpteval.evaluation.fast_lm", "FastLM.loglikelihood_rolling"),
    ("FastLM: outside forwards", "ckpteval.evaluation.fast_lm", "FastLM.generate_until"),
    ("FastLM: construct", "ckpteval.evaluation.harness", "build_lm"),
    ("lm-eval: simple_evaluate (rest)", "lm_eval", "simple_evaluate"),
    ("lm-eval: env info + git", "lm_eval.evaluator", "add_env_info"),
    ("lm-eval: env info + git", "lm_eval.evaluator", "get_git_commit_hash"),
    ("harness: resolve tasks", "ckpteval.modes.harness", "resolve_tasks"),
    ("results: table, files", "ckpteval.modes.harness", "results_table"),
    ("results: table, files", "ckpteval.modes.harness", "save_results"),
    ("results: table, files", "ckpteval.results", "report"),
    ("results: table, files", "ckpteval.results", "publish"),
    ("mlflow: open run", "ckpteval.tracking.run", "open_run"),
    ("mlflow: params", "ckpteval.tracking.run", "Run.log_params"),
    ("mlflow: metrics, tags", "ckpteval.tracking.run", "Run.log_metrics"),
    ("mlflow: metrics, tags", "ckpteval.tracking.run", "Run.set_tags"),
    ("mlflow: artifacts", "ckpteval.tracking.run", "Run.log_artifact"),
    ("mlflow: end run", "ckpteval.tracking.run", "Run.end"),
    ("FastLM: log-softmax of logits", "torch", "log_softmax"),
    ("gc.collect", "gc", "collect"),
    ("sweep: job status file", "ckpteval.scan.callback", "SweepCallback.on_job_end"),
]
NOT_OVERHEAD = ("load", "forward")


def _timed_child(out: str, argv: list[str]) -> None:
    import atexit
    import importlib
    import runpy
    import threading

    totals: dict[str, float] = {}
    stack: list[list[float]] = []  # per open timed call: [time spent in timed calls nested in it]
    cycles: list[dict[str, float]] = []
    mark = [time.perf_counter(), dict(totals)]

    def timer(bucket, fn):
        def wrapped(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                return fn(*args, **kwargs)
            start = time.perf_counter()
            stack.append([0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = stack.pop()[0]
                totals[bucket] = totals.get(bucket, 0.0) + elapsed - nested
                if stack:
                    stack[-1][0] += elapsed
                if fn is run_job:  # a job ended: its cycle is everything since the previous one ended
                    now = time.perf_counter()
                    cycle = {k: v - mark[1].get(k, 0.0) for k, v in totals.items()}
                    cycle["cycle"] = now - mark[0]
                    cycles.append(cycle)
                    mark[:] = [now, dict(totals)]
        return wrapped

    run_job = None
    for bucket, module, attr in TIMERS:
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, name)
        if module == "hydra.core.utils" and name == "run_job":
            run_job = fn
        setattr(owner, name, timer(bucket, fn))
    import hydra._internal.core_plugins.basic_launcher as launcher  # imported run_job by name

    launcher.run_job = importlib.import_module("hydra.core.utils").run_job
    atexit.register(lambda: Path(out).write_text(json.dumps(cycles)))
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_path(argv[0], run_name="__main__")


def overhead_breakdown(cycles: list[dict[str, float]], top: int = 30) -> list[str]:
    """Lines: per-checkpoint cycle, load, forward and overhead (first job, then the mean of the others), and
    the largest overhead buckets of the others."""
    def split(c):
        over = c["cycle"] - sum(c.get(k, 0.0) for k in NOT_OVERHEAD)
        return c["cycle"], c.get("load", 0.0), c.get("forward", 0.0), over

    lines = []
    first, rest = cycles[0], cycles[1:] or cycles[:1]
    cyc, load, fwd, over = split(first)
    lines.append(f"  checkpoint 1: cycle {cyc:.2f} s = load {load:.2f} + forward {fwd:.2f} + overhead {over:.2f} s")
    parts = [split(c) for c in rest]
    mean = [sum(p[i] for p in parts) / len(parts) for i in range(4)]
    lines.append(f"  checkpoints 2..{len(cycles)}: cycle {mean[0]:.2f} s = load {mean[1]:.2f} + forward "
                 f"{mean[2]:.2f} + overhead {mean[3]:.2f} s (mean); overhead per checkpoint "
                 + " ".join(f"{p[3]:.2f}" for p in parts))
    buckets: dict[str, float] = {}
    for c in rest:
        for k, v in c.items():
            if k not in NOT_OVERHEAD and k != "cycle":
                buckets[k] = buckets.get(k, 0.0) + v / len(rest)
    buckets["other (no timer)"] = mean[0] - sum(buckets.values()) - mean[1] - mean[2]
    lines.append("  overhead per checkpoint (mean of 2..N), largest first:")
    lines += [f"    {v:6.3f} s  {k}" for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])[:top] if v >= 0.0005]
    return lines


def scan(tmp: Path, args, env: dict) -> None:
    ckpts = make_hf_checkpoints(tmp, args.size, args.scan)
    sweep = tmp / "multirun"
    cycles_file = tmp / "scan_cycles.json"
    tracking = ([f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"] if args.scan_tracking
                else ["tracking.enabled=false"])
    t_ours, _ = timed([sys.executable, str(Path(__file__).resolve()), "--timed-child", str(cycles_file), "--",
                       str(ROOT / "run.py"), "-m", "mode=harness",
                       f"ckpt=glob:{tmp / 'scan' / 'step_*'}", "harness=offline",
                       f"harness.include_path={TASKS_DIR}", f"harness.batch_size={args.batch_size}",
                       f"eval.device={args.device}", *tracking, f"paths.outputs={tmp / 'out'}",
                       f"hydra.sweep.dir={sweep}"], tmp, env)
    jobs = sorted((json.loads(p.read_text()) for p in sweep.rglob("results.json") if p.parent.parent == sweep),
                  key=lambda r: r["step"])
    t_stock = 0.0
    stock_runs = []
    for k, ckpt in enumerate(ckpts):
        t, _ = timed([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                      f"pretrained={ckpt},dtype=float32", "--tasks", ",".join(TASKS), "--include_path",
                      str(TASKS_DIR), "--batch_size", str(args.batch_size), "--device", args.device,
                      "--output_path", str(tmp / "stock_scan" / str(k)), "--seed", "1234,1234,1234,1234"], tmp, env)
        t_stock += t
        stock_runs.append(stock_metrics(tmp / "stock_scan" / str(k)))
    worst = max((abs(job[key] - v) / max(abs(v), 1e-12) for job, ref in zip(jobs, stock_runs)
                 for key, v in ref.items()), default=float("nan"))
    status = "OK" if len(jobs) == len(stock_runs) and worst <= 1e-4 else "MISMATCH"
    over = [j.get("harness/overhead_s", float("nan")) for j in jobs]
    rest = over[1:] or over
    print(f"scan of {args.scan} checkpoints (tracking {'on, sqlite' if args.scan_tracking else 'off'}): ours (one "
          f"run.py -m) {t_ours:.1f} s, stock ({args.scan} lm_eval runs) {t_stock:.1f} s, speedup "
          f"{t_stock / t_ours:.2f}x; jobs found {len(jobs)}; metrics vs stock: max rel diff {worst:.1e} [{status}]")
    print("per-checkpoint time beyond loading and model forwards, whole job cycle (config composition, MLflow, "
          "results files and everything else included):")
    for line in overhead_breakdown(json.loads(cycles_file.read_text())):
        print(line)
    runtimes = " ".join(f"{j['harness/runtime_s']:.1f}" for j in jobs)
    print(f"  (the jobs' own harness/overhead_s, inside the harness function only: first {over[0]:.2f} s, others "
          f"{min(rest):.2f}..{max(rest):.2f} s, mean {sum(rest) / len(rest):.2f} s; harness/runtime_s {runtimes})")


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return elapsed, proc


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise SystemExit("no result line")


def stock_metrics(out: Path) -> dict[str, float]:
    results = json.loads(max(out.rglob("results_*.json")).read_text())["results"]
    return {f"harness/{task}/{key.split(',')[0]}": value for task in TASKS for key, value in results[task].items()
            if "," in key and isinstance(value, float)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--backends", default="hf,fast", help="our backends to time (fast is skipped if missing)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if shutil.which("nvidia-smi") else "cpu")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--scan", type=int, default=0, help="also time an N-checkpoint scan vs N stock runs")
    parser.add_argument("--only-scan", action="store_true", help="skip the single-checkpoint comparison")
    parser.add_argument("--scan-tracking", action=argparse.BooleanOptionalAction, default=True,
                        help="log the scan to an sqlite MLflow store, as a default scan does (default: on)")
    parser.add_argument("--timed-child", metavar="OUT", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.timed_child:
        return _timed_child(args.timed_child, rest[1:] if rest[:1] == ["--"] else rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    tmp = Path(tempfile.mkdtemp(prefix="bench_harness_"))
    try:
        if args.scan:
            scan(tmp, args, env)
        if args.only_scan:
            return
        ckpt = make_checkpoint(tmp, args.size)
        common = ["harness=offline", f"harness.include_path={TASKS_DIR}", f"harness.batch_size={args.batch_size}",
                  f"eval.device={args.device}", "tracking.enabled=false"]

        hf_dir = tmp / "converted"
        t_convert, _ = timed([sys.executable, str(ROOT / "run.py"), "mode=convert", f"ckpt={ckpt}",
                              f"convert.out={hf_dir}", "tracking.enabled=false", f"hydra.run.dir={tmp / 'h0'}"],
                             tmp, env)
        t_lm_eval, _ = timed([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                              f"pretrained={hf_dir},dtype=float32", "--tasks", ",".join(TASKS), "--include_path",
                              str(TASKS_DIR), "--batch_size", str(args.batch_size), "--device", args.device,
                              "--output_path", str(tmp / "stock"), "--seed", "1234,1234,1234,1234"], tmp, env)
        stock = t_convert + t_lm_eval
        reference = stock_metrics(tmp / "stock")
        print(f"size={args.size} device={args.device} batch_size={args.batch_size} tasks={','.join(TASKS)}")
        print(f"stock: mode=convert {t_convert:.1f} s + lm_eval CLI {t_lm_eval:.1f} s = {stock:.1f} s")

        for backend in [b for b in args.backends.split(",") if b]:
            if backend == "fast":
                try:
                    import ckpteval.evaluation.fast_lm  # noqa: F401
                except ImportError:
                    print("ours (fast): skipped, ckpteval.evaluation.fast_lm is not importable")
                    continue
            t_ours, proc = timed([sys.executable, str(ROOT / "run.py"), "mode=harness", f"ckpt={ckpt}", *common,
                                  f"harness.backend={backend}", f"hydra.run.dir={tmp / backend}"], tmp, env)
            ours = last_json(proc.stdout)
            worst = max(abs(ours[k] - v) / max(abs(v), 1e-12) for k, v in reference.items())
            same = "identical" if worst == 0 else f"max rel diff {worst:.2e}"
            limit = 0 if backend == "hf" else 1e-4
            status = "OK" if worst <= limit else "MISMATCH"
            print(f"ours ({backend}): {t_ours:.1f} s (in-process harness {ours['harness/runtime_s']:.1f} s)  "
                  f"speedup {stock / t_ours:.2f}x  metrics vs stock: {same} [{status}]")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Whole processes: `python run.py mode=harness` vs the stock `lm_eval --model hf` CLI, both at `--batch_size auto`.

    python benchmarks/bench_harness_job.py                                   # tiny Llama on the CPU, seconds
    python benchmarks/bench_harness_job.py --size 1b --dtype bfloat16 --docs 400 --device cuda --json out.json

A random-weight Llama of `--size` is saved as an HF dir (safetensors in `--dtype`, with a word-level tokenizer
whose words are token ids, "w17 w4 ..."), beside two local multiple-choice tasks over the same generated documents
(~100-token questions, 4 choices of 4..20 tokens): `bench_mc` (0-shot) and `bench_mc5` (5-shot, the same five
first documents of the split for every question, as MMLU's dev examples). What a user runs, timed from the
shell, model loading and task building included:

  ours   python run.py mode=harness ckpt=DIR harness.include_path=TASKS harness.tasks=[bench_mc,bench_mc5] \
             harness.batch_size=auto harness.dtype=DTYPE eval.device=DEVICE tracking.enabled=false
  stock  python -m lm_eval run --model hf --model_args pretrained=DIR,dtype=DTYPE --tasks bench_mc,bench_mc5 \
             --include_path TASKS --batch_size auto --device DEVICE

Printed: both wall clocks, the ratio, and each task's acc / acc_norm from both (float32: equal; bfloat16: HFLM
takes the log-softmax in bf16, FastLM in float32, so a near-tie may flip).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import DTYPES, SIZES  # noqa: E402

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
fewshot_delimiter: " "
{fewshot}metric_list:
  - metric: acc
  - metric: acc_norm
"""
TASKS = ("bench_mc", "bench_mc5")


def write_tasks(root: Path, docs: int, vocab: int) -> Path:
    rng = random.Random(1)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(2, vocab)}" for _ in range(n))

    rows = [{"question": words(rng.randint(90, 110)), "choices": [words(rng.randint(4, 20)) for _ in range(4)],
             "label": rng.randrange(4)} for _ in range(docs)]
    root.mkdir(parents=True, exist_ok=True)
    data = root / "bench_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "bench_mc.yaml").write_text(TASK.format(name="bench_mc", data=data, fewshot="num_fewshot: 0\n"))
    fewshot = "num_fewshot: 5\nfewshot_config:\n  sampler: first_n\n"
    (root / "bench_mc5.yaml").write_text(TASK.format(name="bench_mc5", data=data, fewshot=fewshot))
    return root


def write_model(out: Path, size: str, dtype: torch.dtype, device: str) -> Path:
    from bench_fast_lm import build, word_tokenizer

    model = build(size, dtype, device)
    model.save_pretrained(out)
    word_tokenizer(model.config.vocab_size).save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-4000:]}")
    return elapsed


def ours_metrics(log: Path) -> dict[str, float]:
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{") and line.endswith("}"):
            found = json.loads(line)
            return {k: v for k, v in found.items() if k.startswith("harness/")}
    raise SystemExit(f"no result line in {log}")


def stock_metrics(out: Path) -> dict[str, float]:
    results = json.loads(max(out.rglob("results_*.json")).read_text())["results"]
    return {f"harness/{task}/{key.split(',')[0]}": value for task in TASKS for key, value in results[task].items()
            if "," in key and isinstance(value, float)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--batch-size", default="auto", help="both processes (auto, or rows)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--logs", help="keep both processes' logs in this dir")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(
               [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    tmp = Path(tempfile.mkdtemp(prefix="bench_harness_job_"))
    logs = Path(args.logs) if args.logs else tmp
    logs.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = write_model(tmp / "model", args.size, DTYPES[args.dtype], args.device)
        tasks = write_tasks(tmp / "tasks", args.docs, SIZES[args.size]["vocab_size"])
        ours = [sys.executable, str(ROOT / "run.py"), "mode=harness", f"ckpt={model_dir}",
                f"harness.include_path={tasks}", f"harness.tasks=[{','.join(TASKS)}]",
                f"harness.batch_size={args.batch_size}", f"harness.dtype={args.dtype}", f"eval.device={args.device}",
                "harness.log_samples=false", "harness.request_cache=false", "tracking.enabled=false",
                f"paths.outputs={tmp / 'outputs'}", f"hydra.run.dir={tmp / 'ours'}"]
        stock = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                 f"pretrained={model_dir},dtype={args.dtype}", "--tasks", ",".join(TASKS), "--include_path",
                 str(tasks), "--batch_size", str(args.batch_size), "--device", args.device,
                 "--output_path", str(tmp / "stock"), "--seed", "1234,1234,1234,1234"]
        t_stock = timed(stock, tmp, env, logs / "stock.log")
        t_ours = timed(ours, tmp, env, logs / "ours.log")
        mine, theirs = ours_metrics(logs / "ours.log"), stock_metrics(tmp / "stock")
        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        print(f"size={args.size} dtype={args.dtype} docs={args.docs} batch_size={args.batch_size} device={name}")
        print(f"stock lm_eval CLI {t_stock:.1f} s, run.py mode=harness {t_ours:.1f} s: {t_stock / t_ours:.2f}x")
        for key in sorted(theirs):
            if key.endswith("_stderr"):
                continue
            print(f"  {key:28} stock {theirs[key]:.4f}  ours {mine.get(key, float('nan')):.4f}")
        extra = {k: v for k, v in mine.items() if k.endswith(("runtime_s", "overhead_s", "batch_tokens"))}
        print("  ours: " + ", ".join(f"{k.split('/')[-1]} {v:.1f}" for k, v in extra.items()))
        if args.json:
            Path(args.json).write_text(json.dumps({"size": args.size, "dtype": args.dtype, "docs": args.docs,
                                                   "device": name, "stock_s": t_stock, "ours_s": t_ours,
                                                   "ratio": t_stock / t_ours, "stock": theirs, "ours": mine},
                                                  indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

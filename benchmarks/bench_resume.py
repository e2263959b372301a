"""Resume benchmark: a `mode=harness` job killed (SIGKILL) at 60% of its work, then the same command again;
printed: the resumed job's wall clock over an uninterrupted job's, start-up and model load included (goal <= 0.5).

    python benchmarks/bench_resume.py                         # the ~134M Llama of the speed benchmarks (small)
    python benchmarks/bench_resume.py --size tiny --docs 200 --gen 256 --device cuda

The checkpoint is a random-weight Llama (an HF dir with a BPE tokenizer); the tasks are written here with offline
JSON data: a 4-choice multiple-choice task of --docs documents (loglikelihood requests) and a short-answer task of
--gen prompts decoded greedily for up to --max-gen tokens (generate_until). Three processes, one after another:

1. the uninterrupted job, timed;
2. the same job in a fresh result store, killed with SIGKILL (its whole process group, as `kill -9` or a node
   failure does; tests/resume_child.py) right after it recorded the results that took the uninterrupted job
   --fraction (0.6) of its work (the seconds its batches took, in the order it ran them). A kill in the middle of
   a batch would also lose that batch (for generation: a segment of 8 batches);
3. the same command again on that store: it prints `resumed N of M requests (K s of work saved)` per request type
   and computes the rest.

Printed: the three wall clocks, the resumed job's lines, the ratio, and whether every metric of the resumed job is
the uninterrupted job's (bit for bit: it must be). Generation is recorded per segment of 8 batches: with few
segments (--gen / (8 x --batch-size)) the segment under way at the kill is a large share of the work.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from benchmarks.bench_harness import SIZES  # noqa: E402 - after the path set-up

WORDS = ("The quick brown fox jumps over the lazy dog . A checkpoint is a snapshot of the weights of a model during "
         "training . Perplexity is the exponential of the average negative log likelihood per token . Language "
         "models predict the next token given the previous tokens . Evaluation on held-out data tells us whether "
         "the model generalizes .").split()


def write_tasks(out: Path, docs: int, gen: int, max_gen: int, seed: int = 0) -> Path:
    """bench_mc (multiple choice) and bench_gen (generation) task YAMLs over JSON files in `out`."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with open(out / "mc.jsonl", "w") as f:
        f.writelines(json.dumps({"question": sentence(rng.randint(20, 60)), "choices": [sentence(rng.randint(2, 8))
                                for _ in range(4)], "label": rng.randrange(4)}) + "\n" for _ in range(docs))
    with open(out / "gen.jsonl", "w") as f:
        f.writelines(json.dumps({"question": sentence(rng.randint(20, 60)), "answer": sentence(3)}) + "\n" for _ in range(gen))
    (out / "bench_mc.yaml").write_text(f"""task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {out / 'mc.jsonl'}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    (out / "bench_gen.yaml").write_text(f"""task: bench_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {out / 'gen.jsonl'}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return out


def make_checkpoint(root: Path, size: str) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.factories import make_tokenizer

    tok = make_tokenizer(root / "tokenizer", vocab_size=min(SIZES[size]["vocab_size"], 2048))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size], tie_word_embeddings=False, bos_token_id=0, eos_token_id=0))
    ckpt = root / "run" / "step_1000"
    model.save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(tok).save_pretrained(ckpt)
    return ckpt


def run(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, start_new_session=True,
                          check=False)
    elapsed = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n{text[-4000:]}")
    return elapsed, text


def metrics(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{") and line.endswith("}"):
            out = json.loads(line)
            return {k: v for k, v in out.items()  # timings are not results (time/startup_seconds, runtime)
                    if not k.endswith(("runtime_s", "overhead_s")) and not k.startswith("time/")}
    raise SystemExit(f"no result line:\n{text[-3000:]}")


def recorded_seconds(store: Path) -> tuple[float, int]:
    """Seconds of work and results the store's files hold (`<crc32> <json>` lines)."""
    seconds, results = 0.0, 0
    for f in store.glob("*/*.jsonl"):
        for line in f.read_bytes().split(b"\n")[:-1]:
            record = json.loads(line[9:])
            seconds += record["s"]
            results += len(record["r"])
    return seconds, results


def results_at(store: Path, seconds: float) -> int:
    """How many results the uninterrupted job had recorded once its recorded work reached `seconds` (its one
    writer's lines, in the order it computed them)."""
    total, count = 0.0, 0
    for f in store.glob("*/*.jsonl"):
        for line in f.read_bytes().split(b"\n")[:-1]:
            record = json.loads(line[9:])
            total += record["s"]
            count += len(record["r"])
            if total >= seconds:
                return count
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--docs", type=int, default=300, help="multiple-choice documents")
    parser.add_argument("--gen", type=int, default=96, help="generation prompts")
    parser.add_argument("--max-gen", type=int, default=32, help="max new tokens per generation")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=0.6, help="kill after this share of the work")
    parser.add_argument("--device", default="cuda" if shutil.which("nvidia-smi") else "cpu")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        ckpt = make_checkpoint(tmp, args.size)
        tasks = write_tasks(tmp / "tasks", args.docs, args.gen, args.max_gen)

        def job(store: Path, name: str) -> list[str]:
            return ["mode=harness", f"ckpt={ckpt}", f"harness.include_path={tasks}", "harness.tasks=[bench_mc,bench_gen]",
                    f"harness.batch_size={args.batch_size}", f"eval.device={args.device}", "tracking.enabled=false",
                    "harness.log_samples=false", f"cache.dir={store}", f"hydra.run.dir={tmp / name}"]

        print(f"{args.size} Llama on {args.device}: {args.docs} multiple-choice documents (x4 choices), {args.gen} "
              f"generations of <= {args.max_gen} tokens, batch size {args.batch_size}", flush=True)
        full_s, full = run([sys.executable, str(ROOT / "run.py"), *job(tmp / "store_full", "full"), "cache.keep=true"],
                           tmp, env)  # its store kept: how much work, how many results
        work, results = recorded_seconds(tmp / "store_full")
        print(f"uninterrupted job: {full_s:.1f} s ({work:.1f} s of recorded work, {results} results)", flush=True)

        count = results_at(tmp / "store_full", args.fraction * work)
        child = [sys.executable, str(ROOT / "tests" / "resume_child.py"), "SIGKILL", "*", str(count), "--"]
        start = time.perf_counter()
        proc = subprocess.run(child + job(tmp / "store", "killed"), cwd=tmp, env=env, capture_output=True, text=True,
                              start_new_session=True, check=False)
        if "sending SIGKILL" not in proc.stdout:
            sys.exit(f"the job was not killed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        killed_s = time.perf_counter() - start
        done, saved_results = recorded_seconds(tmp / "store")
        print(f"killed job: SIGKILL after {killed_s:.1f} s; {done:.1f} s of work ({saved_results} of {results} "
              f"results) were saved", flush=True)

        resumed_s, resumed = run([sys.executable, str(ROOT / "run.py"), *job(tmp / "store", "resumed")], tmp, env)
        for line in re.findall(r"\w+: resumed \d+ of \d+ \w+ \([\d.]+ s of work saved\) from \S+", resumed):
            print(f"  {line}")
        print(f"resumed job: {resumed_s:.1f} s", flush=True)
        same = metrics(resumed) == metrics(full)
        print(f"resumed / uninterrupted: {resumed_s / full_s:.2f} (goal <= 0.5, start-up included); metrics "
              f"{'identical' if same else 'DIFFERENT'}")
        if not same:
            sys.exit(f"metrics differ:\n{metrics(full)}\n{metrics(resumed)}")
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

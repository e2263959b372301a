"""Fixed cost per process: time from process start to the first request, and the whole process, for
`run.py mode=loss` and `run.py mode=harness` against the stock `lm_eval` CLI on the same local tasks and a plain
transformers script for the loss.

    python benchmarks/bench_startup.py                                   # ~135M Llama, every case, 2 repeats
    python benchmarks/bench_startup.py --cases gen --repeats 3 --work /tmp/bench_startup   # keep + reuse setup
    python benchmarks/bench_startup.py --tracking                        # + ours logging to an sqlite MLflow store
    python benchmarks/bench_startup.py --small --repeats 1               # tiny Llama: a smoke run

Setup (once per --work dir): a random-weight Llama of SmolLM2-135M's shape (vocab 49152, hidden 576, 30 layers,
9 heads, 3 kv heads, intermediate 1536, tied head; saved in bfloat16 as the hub model is, evaluated in float32),
a byte-level BPE tokenizer trained here on the Python standard library's sources, two local tasks read from
JSON-lines files (`dataset_path: json`), and token shards for the loss. Cases:

  loss  `run.py mode=loss data=local eval.steps=-1` vs a plain transformers script (`from_pretrained`, then
        `model(input_ids=w, labels=w).loss` per batch, token-weighted), same windows; loss compared.
  mc    5-shot multiple choice (loglikelihood), --mc-docs documents under one first_n preamble (MMLU-style
        per-subject dev examples), batch 8: `run.py mode=harness` vs `lm_eval run --model hf --include_path`.
  gen   3-shot generate_until, 80 documents, max 8 tokens, batch 8, same comparison; metrics and every
        generation compared.
  index lm-eval's task index of the built-in tasks + the include path: a fresh `TaskManager(include_path=...)`
        (what the stock CLI builds in every process) vs ours read from its cache (after one cold run, printed).

Every process runs under a timer (this script's --child mode: nothing changes in the program, a meta-path
finder times each module's execution and a few library functions are wrapped) that reports, up to the first
model forward (the first request) and for the whole process, exclusive times of: Python start-up, imports (and
which packages), task resolution (TaskManager and the tasks' datasets; ours: resolve_tasks), tokenizer load,
model load (from_pretrained / our load_model, imports inside excluded), MLflow (ours: opening the run) and
the rest. "start->1st - load" is the figure the fixed-cost goal is about: at most 4 s beyond model load.
Runs alternate between the programs of a case (the fastest of --repeats counts, all are printed) and the load
average is printed with each: other processes on a shared machine only slow a run down.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
TINY = {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 144, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        "tie_word_embeddings": True}
EOS = "<|endoftext|>"
BUCKETS = ("python", "imports", "tasks", "tokenizer", "model load", "mlflow", "other")


# ------------------------------------------------------------------------------------------ the timed child
# `--child OUT -- PROGRAM ARGS` runs PROGRAM (a script path, or `-m module`) in this process. Time is exclusive:
# an import inside a model load counts as import, a model load inside task resolution as model load.

WRAPS = [  # (bucket, module, attribute path): wrapped once the module has been imported
    ("tasks", "lm_eval.tasks.manager", "TaskManager.__init__"),
    ("tasks", "lm_eval.tasks.manager", "TaskManager.load"),
    ("tasks", "ckpteval.evaluation.harness", "resolve_tasks"),
    ("tasks", "ckpteval.evaluation.task_index", "cached_task_manager"),
    ("tokenizer", "transformers.tokenization_utils_base", "PreTrainedTokenizerBase.from_pretrained"),
    ("tokenizer", "transformers.models.auto.tokenization_auto", "AutoTokenizer.from_pretrained"),
    ("tokenizer", "ckpteval.checkpoint.load", "load_tokenizer"),
    ("model load", "transformers.modeling_utils", "PreTrainedModel.from_pretrained"),
    ("model load", "ckpteval.checkpoint.load", "load_model"),
    ("mlflow", "ckpteval.tracking.run", "open_run"),
]


class Clock:
    """Exclusive time per bucket, main thread only; `snapshot` freezes the totals at the first forward."""

    def __init__(self) -> None:
        import threading

        self.main = threading.main_thread()
        self.threading = threading
        self.totals: dict[str, float] = {}
        self.packages: dict[str, float] = {}
        self.stack: list[list] = []
        self.first: dict | None = None

    def enter(self) -> bool:
        if self.threading.current_thread() is not self.main:
            return False
        self.stack.append([time.perf_counter(), 0.0])
        return True

    def leave(self, bucket: str, package: str | None = None) -> None:
        start, nested = self.stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[bucket] = self.totals.get(bucket, 0.0) + elapsed - nested
        if package:
            self.packages[package] = self.packages.get(package, 0.0) + elapsed - nested
        if self.stack:
            self.stack[-1][1] += elapsed

    def wrap(self, bucket: str, fn):
        def timed(*args, **kwargs):
            if not self.enter():
                return fn(*args, **kwargs)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave(bucket)
        return timed

    def report(self, wall_start: float) -> dict:
        now = time.time()
        return {"t": now - wall_start, "totals": dict(self.totals), "packages": dict(self.packages)}


def _install_child(clock: Clock, wall_start: float) -> None:
    import importlib.abc
    import zipimport

    patches: dict[str, list[tuple[str, str]]] = {}
    for bucket, module, attr in WRAPS:
        patches.setdefault(module, []).append((bucket, attr))

    def patch(name: str, module) -> None:
        for bucket, attr in patches.get(name, []):
            *path, last = attr.split(".")
            owner = module
            for part in path:
                owner = getattr(owner, part, None)
            raw = owner.__dict__.get(last) if isinstance(owner, type) else getattr(owner, last, None)
            if raw is None:
                continue
            if isinstance(raw, (classmethod, staticmethod)):
                setattr(owner, last, type(raw)(clock.wrap(bucket, raw.__func__)))
            else:
                setattr(owner, last, clock.wrap(bucket, raw))
        if name == "torch.nn.modules.module":
            handle = None

            def first_forward(_module, _args):
                if clock.first is None:
                    clock.first = clock.report(wall_start)
                    handle.remove()

            handle = module.register_module_forward_pre_hook(first_forward)

    class Finder(importlib.abc.MetaPathFinder):
        busy = False

        def find_spec(self, name, path=None, target=None):
            if Finder.busy:
                return None
            Finder.busy = True
            try:
                spec = None
                for finder in sys.meta_path:
                    if finder is self or not hasattr(finder, "find_spec"):
                        continue
                    spec = finder.find_spec(name, path, target)
                    if spec is not None:
                        break
            finally:
                Finder.busy = False
            loader = getattr(spec, "loader", None)
            run = getattr(loader, "exec_module", None)
            if run is None or isinstance(loader, (type, zipimport.zipimporter)):
                return spec

            def exec_module(module, _run=run, _name=name):
                timed = clock.enter()
                try:
                    _run(module)
                finally:
                    if timed:
                        clock.leave("imports", _name.split(".")[0])
                patch(_name, module)

            try:
                loader.exec_module = exec_module
            except (AttributeError, TypeError):
                pass
            return spec

    sys.meta_path.insert(0, Finder())


def run_child(out: str, argv: list[str]) -> None:
    import atexit
    import runpy

    launched = float(os.environ.pop("BENCH_STARTUP_LAUNCHED", time.time()))
    clock = Clock()
    python_s = time.time() - launched
    _install_child(clock, launched)

    def write() -> None:
        Path(out).write_text(json.dumps({"python": python_s, "first": clock.first, "end": clock.report(launched)}))

    atexit.register(write)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        runpy.run_path(argv[0], run_name="__main__")


# ------------------------------------------------------------------------------------------ setup


def words_from_stdlib(n: int = 3000) -> list[str]:
    """The `n` most common alphabetic words of the standard library's sources (deterministic per Python)."""
    import collections
    import re

    counts: collections.Counter = collections.Counter()
    for path in sorted(Path(os.__file__).parent.glob("*.py"))[:400]:
        counts.update(w.lower() for w in re.findall(r"[A-Za-z]{3,12}", path.read_text(errors="ignore")))
    return [w for w, _ in counts.most_common(n)]


def train_tokenizer(out: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained on the standard library's sources, saved as an HF tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts(limit: int = 8_000_000):
        for path in sorted(Path(os.__file__).parent.rglob("*.py")):
            text = path.read_text(errors="ignore")
            yield text
            limit -= len(text)
            if limit <= 0:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS)
    fast.save_pretrained(out)
    return out


def make_model(out: Path, shape: dict, tokenizer: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.to(torch.bfloat16).save_pretrained(out)  # as SmolLM2-135M is published: bfloat16 safetensors
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return out


def write_tasks(out: Path, words: list[str], mc_docs: int, gen_docs: int) -> Path:
    """bench_mc (5-shot multiple choice) and bench_gen (3-shot generate_until) over JSON-lines files."""
    import random

    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    def jsonl(name: str, rows: list[dict]) -> str:
        path = out / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    def mc(n):
        return [{"question": text(20, 30), "choices": [text(2, 5) for _ in range(4)], "label": rng.randrange(4)}
                for _ in range(n)]

    def gen(n):
        return [{"question": text(12, 20), "answer": text(1, 2)} for _ in range(n)]

    common = ("training_split: train\ntest_split: test\nfewshot_split: train\nfewshot_config:\n  sampler: first_n\n"
              "metadata:\n  version: 1.0\n")
    (out / "bench_mc.yaml").write_text(
        "task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    train: {jsonl('mc_train.jsonl', mc(5))}\n    test: {jsonl('mc_test.jsonl', mc(mc_docs))}\n"
        "output_type: multiple_choice\nnum_fewshot: 5\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n" + common)
    (out / "bench_gen.yaml").write_text(
        "task: bench_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    train: {jsonl('gen_train.jsonl', gen(3))}\n    test: {jsonl('gen_test.jsonl', gen(gen_docs))}\n"
        "output_type: generate_until\nnum_fewshot: 3\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \" {{answer}}\"\ntarget_delimiter: \"\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
        "  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n"
        "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n" + common)
    return out


def make_shards(out: Path, tokenizer: Path, words: list[str], tokens: int) -> Path:
    """Token shards for the loss: text of the word list, tokenized, as uint16 .bin files (two files)."""
    import random

    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    rng = random.Random(1)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        ids: list[int] = []
        while len(ids) < tokens // 2:
            ids += tok(" ".join(rng.choice(words) for _ in range(200)))["input_ids"] + [tok.eos_token_id]
        np.asarray(ids[: tokens // 2], dtype=np.uint16).tofile(out / f"shard_{k}.bin")
    return out


PLAIN_LOSS = '''"""The plain transformers loss loop: from_pretrained, then model(input_ids=w, labels=w).loss per batch.
"""
import json, sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

model_dir, data_dir, seq_len, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
windows = []
for f in sorted(data_dir.glob("*.bin")):
    arr = np.fromfile(f, dtype=np.uint16).astype(np.int64)
    windows += [arr[k * seq_len: k * seq_len + seq_len + 1] for k in range((len(arr) - 1) // seq_len)]
total, count = 0.0, 0
with torch.no_grad():
    for i in range(0, len(windows), batch):
        w = torch.from_numpy(np.stack(windows[i:i + batch]))
        n = w.shape[0] * seq_len
        total += model(input_ids=w, labels=w).loss.double().item() * n
        count += n
print(json.dumps({"loss": total / count, "tokens": count}))
'''


INDEX = '''"""lm-eval's task index of an include path and the built-in tasks: `fresh` (lm-eval's TaskManager) or
`cached` (ours)."""
import sys
from pathlib import Path

if sys.argv[1] == "fresh":
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=sys.argv[2])
else:
    from ckpteval.evaluation.task_index import cached_task_manager

    manager = cached_task_manager(sys.argv[2], True, Path(sys.argv[3]))
print(len(manager.task_index), len(manager.all_groups), len(manager.all_tags))
'''


def setup(work: Path, args) -> dict:
    shape = TINY if args.small else SMOLLM2_135M
    marker = work / "setup.json"
    want = {"shape": shape, "mc_docs": args.mc_docs, "gen_docs": args.gen_docs, "loss_tokens": args.loss_tokens}
    (work / "plain_loss.py").write_text(PLAIN_LOSS)
    (work / "index.py").write_text(INDEX)
    if marker.exists() and json.loads(marker.read_text()) == want:
        return want
    print(f"setup in {work} (model, tokenizer, tasks, shards; once per --work dir)", flush=True)
    shutil.rmtree(work / "model", ignore_errors=True)
    words = words_from_stdlib()
    tok = train_tokenizer(work / "tokenizer", min(shape["vocab_size"], 49152))
    make_model(work / "model", shape, tok)
    write_tasks(work / "tasks", words, args.mc_docs, args.gen_docs)
    make_shards(work / "shards", tok, words, args.loss_tokens)
    import datasets  # build the HF datasets cache of the JSON files now, so no timed run pays it

    for name in ("mc", "gen"):
        datasets.load_dataset("json", data_files={"train": str(work / "tasks" / f"{name}_train.jsonl"),
                                                  "test": str(work / "tasks" / f"{name}_test.jsonl")})
    marker.write_text(json.dumps(want))
    return want


# ------------------------------------------------------------------------------------------ runs


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def timed_run(work: Path, label: str, program: list[str], env: dict) -> dict:
    """One process under the child timer: wall clock, breakdown up to the first forward and overall, stdout."""
    out = work / "timings" / f"{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(out), "--", *program]
    load = load_average()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launched = time.time()
    proc = subprocess.run(cmd, cwd=work, env={**env, "BENCH_STARTUP_LAUNCHED": repr(launched)},
                          capture_output=True, text=True, check=False)
    wall = time.time() - launched
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    (work / "timings" / f"{label}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{label} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    t = json.loads(out.read_text())
    return {"label": label, "wall": wall, "cpu": cpu, "timing": t, "stdout": proc.stdout, "load": load}


def parts(t: dict, key: str) -> dict[str, float]:
    """Buckets of one run at `key` ("first" or "end"): python start-up, the timed buckets, and the rest."""
    snap = t[key] or t["end"]
    out = {"python": t["python"], **{b: snap["totals"].get(b, 0.0) for b in BUCKETS[1:-1]}}
    out["other"] = snap["t"] - sum(out.values())
    out["t"] = snap["t"]
    return out


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise SystemExit(f"no result line in:\n{stdout[-2000:]}")


def stock_results(out: Path) -> tuple[dict, dict]:
    """The stock CLI's results JSON as our flat metrics, and its samples by task."""
    from ckpteval.evaluation.harness import harness_metrics

    path = max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    metrics, _ = harness_metrics(json.loads(path.read_text()))
    samples = {}
    for f in path.parent.glob("samples_*.jsonl"):
        task = f.name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return metrics, samples


def ours_samples(run_dir: Path) -> dict:
    return {f.stem[len("samples_"):]: [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            for f in run_dir.rglob("samples_*.jsonl")}


def compare_harness(ours: dict, ours_dir: Path, stock_dir: Path, task: str) -> str:
    ref, ref_samples = stock_results(stock_dir)
    keys = [k for k in ref if k.startswith(f"harness/{task}/") and not k.endswith("/n_samples")]
    worst = max(abs(ours[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in keys)
    text = "identical" if worst == 0 else f"max rel diff {worst:.1e}"
    ok = worst <= 1e-4
    if task == "bench_gen":
        mine = {s["doc_id"]: s["filtered_resps"] for s in ours_samples(ours_dir).get(task, [])}
        theirs = {s["doc_id"]: s["filtered_resps"] for s in ref_samples.get(task, [])}
        same = sum(mine.get(d) == r for d, r in theirs.items())
        text += f", generations {same}/{len(theirs)} identical"
        ok = ok and same == len(theirs) and len(mine) == len(theirs)
    return f"{text} [{'OK' if ok else 'MISMATCH'}]"


def case_programs(case: str, work: Path, args, r: int) -> list[tuple[str, list[str]]]:
    model, tasks = work / "model", work / "tasks"
    ours_common = [str(ROOT / "run.py"), f"ckpt={model}", f"paths.outputs={work / 'outputs'}"]
    tracking = {"ours": ["tracking.enabled=false"],
                "ours+mlflow": [f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]}
    variants = ["ours", "ours+mlflow"] if args.tracking else ["ours"]
    if case == "index":
        index = [str(work / "index.py")]
        return [("stock", [*index, "fresh", str(tasks)]),
                ("ours", [*index, "cached", str(tasks), str(work / "outputs" / "harness_task_index")])]
    if case == "loss":
        data = ["data=local", f"data.dataset_path={work / 'shards'}", f"eval.seq_len={args.seq_len}",
                f"eval.batch_size={args.loss_batch}", "eval.steps=-1"]
        progs = [("plain", [str(work / "plain_loss.py"), str(model), str(work / "shards"), str(args.seq_len),
                            str(args.loss_batch)])]
        progs += [(v, [*ours_common, "mode=loss", *data, *tracking[v],
                       f"hydra.run.dir={work / 'runs' / f'{v}_{case}_{r}'}"]) for v in variants]
        return progs
    task = f"bench_{case}"
    progs = [("stock", ["-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
                        "--tasks", task, "--include_path", str(tasks), "--batch_size", str(args.batch_size),
                        "--device", "cpu", "--output_path", str(work / "runs" / f"stock_{case}_{r}"),
                        "--seed", "1234,1234,1234,1234", "--log_samples"])]
    progs += [(v, [*ours_common, "mode=harness", f"harness.tasks=[{task}]", f"harness.include_path={tasks}",
                   f"harness.batch_size={args.batch_size}", *tracking[v],
                   f"hydra.run.dir={work / 'runs' / f'{v}_{case}_{r}'}"]) for v in variants]
    return progs


def check(case: str, name: str, run: dict, work: Path, r: int, runs: dict) -> str:
    if case == "index":
        counts = run["stdout"].split()
        same = counts == runs["stock"][r]["stdout"].split()
        return f"{counts[0]} entries" + ("" if name == "stock" else f", same counts [{'OK' if same else 'MISMATCH'}]")
    if name == "plain":
        return f"loss {last_json(run['stdout'])['loss']:.6f}"
    if case == "loss":
        ours = last_json(run["stdout"])["eval/loss"]
        plain = last_json(runs["plain"][r]["stdout"])["loss"]
        ok = "OK" if abs(ours - plain) < 1e-4 else "MISMATCH"
        return f"loss {ours:.6f}, |diff| vs plain {abs(ours - plain):.1e} [{ok}]"
    if name == "stock":
        return ""
    return compare_harness(last_json(run["stdout"]), work / "runs" / f"{name}_{case}_{r}",
                           work / "runs" / f"stock_{case}_{r}", f"bench_{case}")


def print_case(case: str, runs: dict[str, list[dict]], notes: dict[str, list[str]]) -> None:
    ref = "plain" if case == "loss" else "stock"
    print(f"\n{case}: seconds, fastest of {len(runs[ref])} runs; whole = process wall clock (cpu: its CPU time), "
          f"->1st = start to the first request, split below into exclusive parts; exit = after the last atexit "
          f"handler")
    print(f"{'program':<12}{'whole':>7}{'cpu':>7}{'ratio':>7}{'->1st':>7}{'-load':>7} |"
          + "".join(f"{b:>8}" for b in (*BUCKETS[:3], "tokenizr", "load", *BUCKETS[5:])) + f"{'exit':>7} | load avg"
          + "       check")
    best_ref = min(r["wall"] for r in runs[ref])
    for name, rs in runs.items():
        i = min(range(len(rs)), key=lambda k: rs[k]["wall"])
        best = rs[i]
        p = parts(best["timing"], "first")
        exit_s = best["wall"] - best["timing"]["end"]["t"]
        print(f"{name:<12}{best['wall']:7.2f}{best['cpu']:7.1f}{best_ref / best['wall']:6.2f}x{p['t']:7.2f}"
              f"{p['t'] - p['model load']:7.2f} |" + "".join(f"{p[b]:8.2f}" for b in BUCKETS)
              + f"{exit_s:7.2f} | {best['load']:<14} {notes[name][i]}")
    for name, rs in runs.items():
        print(f"  {name}: every run (whole / ->1st): " + ", ".join(
            f"{r['wall']:.1f} / {parts(r['timing'], 'first')['t']:.1f}" for r in rs))
        best = min(rs, key=lambda r: r["wall"])
        pk = (best["timing"]["first"] or best["timing"]["end"])["packages"]
        top = sorted(pk.items(), key=lambda kv: -kv[1])[:7]
        print("    imports before the first request, by package: " + ", ".join(f"{k} {v:.2f}" for k, v in top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="index,loss,mc,gen")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", help="setup + runs dir, kept and reused (default: a temp dir, removed)")
    parser.add_argument("--small", action="store_true", help="tiny Llama (a smoke run)")
    parser.add_argument("--tracking", action="store_true", help="also time ours logging to an sqlite MLflow store")
    parser.add_argument("--mc-docs", type=int, default=40)
    parser.add_argument("--gen-docs", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loss-tokens", type=int, default=4200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--loss-batch", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        return run_child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_startup_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        setup(work, args)
        print(f"{'tiny' if args.small else '~135M (SmolLM2-135M shape)'} Llama, float32 on CPU, {os.cpu_count()} "
              f"cores; load average at start {load_average()}")
        for case in [c for c in args.cases.split(",") if c]:
            if case == "index":  # the first cached run builds and writes the cache: time it once, untimed after
                cold = timed_run(work, "ours_index_cold", case_programs(case, work, args, 0)[1][1], env)
                print(f"\nindex: first process (nothing cached yet: lm-eval indexes, the cache is written) "
                      f"{cold['wall']:.1f} s")
            runs: dict[str, list[dict]] = {}
            notes: dict[str, list[str]] = {}
            for r in range(args.repeats):
                progs = case_programs(case, work, args, r)
                for name, program in (progs if r % 2 == 0 else progs[::-1]):
                    runs.setdefault(name, []).append(timed_run(work, f"{name}_{case}_{r}", program, env))
            for r in range(args.repeats):
                for name in runs:
                    notes.setdefault(name, []).append(check(case, name, runs[name][r], work, r, runs))
            runs = {name: runs[name] for name, _ in case_programs(case, work, args, 0)}
            print_case(case, runs, notes)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""FastLM vs lm-eval's HFLM on four request shapes, same model, same requests, same batch size, one process.

    python benchmarks/bench_harness_speed.py                 # ~134M Llama (random weights), float32
    python benchmarks/bench_harness_speed.py --dtype bfloat16 --device cuda   # a bf16 model on a GPU
    python benchmarks/bench_harness_speed.py --docs 3 --cases b   # one case, fewer documents (a loaded machine)
    python benchmarks/bench_harness_speed.py --small         # tiny Llama, a smoke run in seconds
    python benchmarks/bench_harness_speed.py --cases b,c     # some of: a b c d
    python benchmarks/bench_harness_speed.py --size 8b --dtype bfloat16 --device cuda --batch auto --cases a,b,c
                      # Llama-3-shaped 8B on a GPU, both backends at batch_size=auto (HFLM: lm-eval's own probe)
    python benchmarks/bench_harness_speed.py --batch auto --fast-ref-batch 8   # + FastLM at batch 8 in the same
                      # run: harness.batch_size=auto against a fixed batch, same requests, timed alternately

Cases (text over a word-level tokenizer whose words are token ids, "w17 w4 ..."):
  (a) 0-shot multiple choice: ~100-token context, 4 choices of 4..20 tokens.
  (b) 5-shot multiple choice: documents in groups, each group under its own 5-example preamble (~500 tokens,
      MMLU-style per-subject dev examples), then the document (~100 tokens) and 4 choices.
  (c) generate_until, short answers, GSM8K-style: one fixed 5-shot preamble (~600 tokens) shared by every
      document (as lm-eval's gsm8k-cot: 8 fixed first_n shots; plain gsm8k draws 5 random shots per document,
      which share no preamble), a 40..100-token question, max_gen_toks=32, and two stop strings ("wN ") taken
      from the model's own greedy output (rows stop at different points, as real short answers do; the EOS text
      is "</s>", which no word contains); identical text is checked. --no-gen-stops: every answer runs to
      max_gen_toks (decoding-bound worst case). --gen-groups/--gen-docs/--gen-shots/--gen-shot-len/--gen-question/
      --max-gen-toks vary the shape; round one's shape was
      --gen-groups 2 --gen-docs 4 --gen-shots 3 --gen-shot-len 100 --gen-question 40-60 --max-gen-toks 16.
  (d) loglikelihood_rolling, max_length 1024: --rolling uniform (default): 2 x docs documents of 50..1536 tokens
      (at most two windows); --rolling wiki: docs wikitext-like articles, log-normal around 2.5 windows. Both
      backends run the same real tokens; the printed padded-token ratio bounds the speed-up.

Per case: requests/s of both, the ratio, peak memory of each loop (CPU: RSS high-water mark above the start of
the loop, /proc/self/clear_refs), max |dLL| (a, b, d), identical is_greedy / accuracy / generations, and the
share of this machine's measured matmul peak (in the model's dtype) reached counting 2 * params * tokens each backend actually
ran. Each backend runs `--repeats` times, alternating with the other, the fastest counts (other processes on a
shared machine only slow a run down); all timings are printed. With --fast-ref-batch N a third backend, FastLM at
batch N, runs in the same alternation: its req/s, FastLM's (at --batch) ratio to it, and max |dLL| / identical text
between the two FastLMs.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import DTYPES, SIZES, matmul_peak, peak_since, reset_peak  # noqa: E402
from bench_fast_lm import build, word_tokenizer  # noqa: E402


def _words(rng: random.Random, vocab: int, n: int) -> str:
    return " ".join(f"w{rng.randrange(2, vocab)}" for _ in range(n))


def mc_requests(rng, vocab: int, docs: int, preamble: str = "") -> list:
    from lm_eval.api.instance import Instance

    out = []
    for _ in range(docs):
        ctx = (preamble + " " if preamble else "") + _words(rng, vocab, rng.randint(90, 110))
        out += [Instance("loglikelihood", {}, (ctx, " " + _words(rng, vocab, rng.randint(4, 20))), c)
                for c in range(4)]
    return out


def fewshot_requests(rng, vocab: int, groups: int, docs: int, shots: int, shot_len: int) -> list:
    out = []
    for _ in range(groups):
        preamble = " ".join(_words(rng, vocab, rng.randint(shot_len - 10, shot_len + 10)) for _ in range(shots))
        out += mc_requests(rng, vocab, docs, preamble)
    return out


def gen_prompts(rng, vocab: int, groups: int, docs: int, shots: int, shot_len: int, question: tuple[int, int]
                ) -> tuple[list[str], int]:
    """`groups` few-shot preambles (`shots` examples of ~shot_len words), `docs` questions under each; and the
    total preamble tokens."""
    out, pre_tokens = [], 0
    for _ in range(groups):
        preamble = " ".join(_words(rng, vocab, rng.randint(shot_len - 10, shot_len + 10)) for _ in range(shots))
        pre_tokens += len(preamble.split())
        out += [preamble + " " + _words(rng, vocab, rng.randint(*question)) for _ in range(docs)]
    return out, pre_tokens


def rolling_requests(rng, vocab: int, docs: int, lengths: list[int]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood_rolling", {}, (_words(rng, vocab, n),), i) for i, n in enumerate(lengths)]


def rolling_lengths(rng, shape: str, docs: int, max_length: int) -> list[int]:
    """Document lengths in tokens. uniform: 50 .. 1.5 x max_length (the first shape; at most 2 windows).
    wiki: wikitext-like articles, log-normal around 2.5 windows (0.3 .. 6 windows): most windows full."""
    if shape == "uniform":
        return [rng.randint(50, int(max_length * 1.5)) for _ in range(docs)]
    return [int(min(max(math.exp(rng.gauss(math.log(2.5 * max_length), 0.7)), 0.3 * max_length), 6 * max_length))
            for _ in range(docs)]


def padded_window_tokens(lm, reqs, batch: int) -> dict:
    """Input tokens each backend runs, padding included: HFLM batches `batch` windows in document order, each
    batch padded to its longest; FastLM sorts every window by length. Their ratio bounds (d)'s speed-up, since
    both run the same real tokens through the same model."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    lens = [len(c) + len(k) - 1 for r in reqs for c, k in map(make_disjoint_window, get_rolling_token_windows(
        token_list=lm.tok_encode(r.args[0]), prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length,
        context_len=1))]

    def padded(seq):
        return sum(max(seq[i:i + batch]) * len(seq[i:i + batch]) for i in range(0, len(seq), batch))

    return {"real": sum(lens), "windows": len(lens), "hf": padded(lens), "fast": padded(sorted(lens, reverse=True))}


def gen_tokenizer(vocab: int):
    """`word_tokenizer` with ids 0 and 1 (pad/unk, BOS/EOS) named "<unk>" and "</s>": no word contains them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<unk>",
                                   unk_token="<unk>")


def stop_words(model, tok, prompts: list[str], max_gen: int) -> list[str]:
    """Two words the model's greedy continuations of (up to 8 of) the prompts contain early, as stop strings
    ("wN "), found with a plain transformers greedy loop before anything is timed."""
    counts: dict[str, int] = {}
    tok.padding_side = "left"
    batch = tok(prompts[:8], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_gen, do_sample=False, pad_token_id=0)
    tok.padding_side = "right"
    for row in out[:, batch["input_ids"].shape[1]:]:
        for w in set(tok.decode(row).split()[1:max_gen // 2]):
            counts[w] = counts.get(w, 0) + 1
    best = sorted(counts, key=lambda w: -counts[w])[:2]
    return [f"{w} " for w in best]  # "w17 " is word 17 and nothing else ("w1" would also match w12, w1234 ...)


def timed(backends: dict, repeats: int, device: str) -> dict:
    """name -> (times, peak memory, last results) for `backends` (name -> (call, warm-up)). Repeats alternate
    between the backends, so a load change on a shared machine hits both alike; the fastest run counts."""
    for _, warm in backends.values():
        warm()  # warm-up on a few requests: allocator, kernel selection, lazy imports
    out = {name: ([], 0, None) for name in backends}
    for _ in range(repeats):
        for name, (fn, _) in backends.items():
            base = reset_peak(device)
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            times, peak, _ = out[name]
            out[name] = (times + [elapsed], max(peak, peak_since(device, base)), result)
    return out


def run_case(name: str, fast, hf, method: str, reqs: list, tokens: dict, args, params: int, peak: float,
             ref=None) -> dict:
    """Time `method` of both backends (and `ref`, FastLM at --fast-ref-batch) on `reqs` (after a warm-up on the
    first two)."""
    n = len(reqs)
    backends = {}
    for key, lm in (("fast", fast), ("hf", hf)) + ((("ref", ref),) if ref is not None else ()):
        call = getattr(lm, method)
        backends[key] = (lambda call=call: call(reqs, disable_tqdm=True),
                         lambda call=call: call(reqs[:2], disable_tqdm=True))
    runs = timed(backends, args.repeats, args.device)
    (t_fast, m_fast, r_fast), (t_hf, m_hf, r_hf) = runs["fast"], runs["hf"]
    rps_fast, rps_hf = n / min(t_fast), n / min(t_hf)
    if name == "c":
        same = sum(a == b for a, b in zip(r_fast, r_hf))
        diff, check = float("nan"), f"{same}/{n} identical text"
    else:
        fl = [x if isinstance(x, float) else x[0] for x in r_fast]
        hl = [x if isinstance(x, float) else x[0] for x in r_hf]
        diff = max(abs(a - b) for a, b in zip(fl, hl))
        check = ""
        if name == "d":  # a document's total sums float32 window sums over thousands of tokens: relative
            check = f"max rel|dLL| {max(abs(a - b) / abs(b) for a, b in zip(fl, hl)):.1e}"
        if name in ("a", "b"):
            greedy = sum(a[1] == b[1] for a, b in zip(r_fast, r_hf))
            acc = [[max(range(4), key=lambda c: r[k + c][0]) for k in range(0, n, 4)] for r in (r_fast, r_hf)]
            check = f"greedy= {greedy}/{n}, argmax choice identical {acc[0] == acc[1]}"
    frac = {k: 2 * params * tokens[k] / min(t) / peak for k, t in (("fast", t_fast), ("hf", t_hf))}
    if args.json:
        import json

        chosen = fast.rows_plan.chosen() if hasattr(fast, "rows_plan") else {}
        with open(args.json, "a") as f:
            f.write(json.dumps({"case": name, "requests": n, "fast_rps": rps_fast, "hf_rps": rps_hf,
                                "ratio": rps_fast / rps_hf, "fast_peak_mb": m_fast / 2**20, "hf_peak_mb": m_hf / 2**20,
                                "max_abs_dll": diff, "check": check, "fast_share_of_peak": frac["fast"],
                                "hf_share_of_peak": frac["hf"], "fast_s": t_fast, "hf_s": t_hf,
                                "batch": str(args.batch), "hf_batch_sizes": str(getattr(hf, "batch_sizes", "")),
                                **chosen}) + "\n")
    print(f"({name}) {n:4d} req  fast {rps_fast:8.2f} req/s  HFLM {rps_hf:8.2f} req/s  ratio {rps_fast / rps_hf:6.2f}x  "
          f"peak MB fast {m_fast / 2**20:7.1f} HFLM {m_hf / 2**20:7.1f}  max|dLL| {diff:.1e}  {check}")
    print(f"    %matmul peak (2*params*tokens run): fast {100 * frac['fast']:.1f}% HFLM {100 * frac['hf']:.1f}%; "
          f"tokens run fast {tokens['fast']} HFLM {tokens['hf']}; seconds fast {_fmt(t_fast)} HFLM {_fmt(t_hf)}")
    if ref is not None:
        _compare_ref(name, n, runs, args, fast.rows_plan.chosen() if hasattr(fast, "rows_plan") else {})
    return {"ratio": rps_fast / rps_hf, "out": r_hf}


def _compare_ref(name: str, n: int, runs: dict, args, chosen: dict) -> None:
    """FastLM at --batch against FastLM at --fast-ref-batch: speed, and the same numbers (text for (c))."""
    (t_fast, m_fast, r_fast), (t_ref, m_ref, r_ref) = runs["fast"], runs["ref"]
    if name == "c":
        same = f"{sum(a == b for a, b in zip(r_fast, r_ref))}/{n} identical text"
    else:
        fl = [x if isinstance(x, float) else x[0] for x in r_fast]
        rl = [x if isinstance(x, float) else x[0] for x in r_ref]
        same = f"max|dLL| {max(abs(a - b) for a, b in zip(fl, rl)):.1e}"
        if name != "d":
            same += f", greedy= {sum(a[1] == b[1] for a, b in zip(r_fast, r_ref))}/{n}"
    ratio = min(t_ref) / min(t_fast)
    print(f"    fast@{args.batch} vs fast@{args.fast_ref_batch}: {n / min(t_fast):.2f} vs {n / min(t_ref):.2f} req/s = "
          f"{ratio:.2f}x; peak MB {m_fast / 2**20:.1f} vs {m_ref / 2**20:.1f}; {same}; seconds fast@"
          f"{args.fast_ref_batch} {_fmt(t_ref)}" + (f"; auto chose {chosen}" if chosen else ""))
    if args.json:
        import json

        with open(args.json, "a") as f:
            f.write(json.dumps({"case": name, "ref_batch": args.fast_ref_batch, "fast_rps": n / min(t_fast),
                                "ref_rps": n / min(t_ref), "fast_vs_ref": ratio, "ref_peak_mb": m_ref / 2**20,
                                "ref_check": same, "ref_s": t_ref, **chosen}) + "\n")


def _fmt(times: list[float]) -> str:
    return " ".join(f"{t:.2f}" for t in times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny model, few requests: seconds")
    ap.add_argument("--cases", default="a,b,c,d")
    ap.add_argument("--batch", default="8", help="rows per forward of both backends, or auto (FastLM: its token "
                    "budget from free memory; HFLM: lm-eval's --batch_size auto)")
    ap.add_argument("--fast-ref-batch", type=int, default=None, help="also FastLM at this fixed batch, timed in the "
                    "same alternation (e.g. --batch auto --fast-ref-batch 8: auto against a fixed batch)")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="model (default: small; --small: tiny)")
    ap.add_argument("--json", help="append one JSON line per case here")
    ap.add_argument("--docs", type=int, default=4, help="documents per group; (a) and (d) use twice as many")
    ap.add_argument("--groups", type=int, default=2, help="(b): groups of documents, each its own preamble")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rolling", choices=["uniform", "wiki"], default="uniform", help="(d) document lengths")
    ap.add_argument("--gen-groups", type=int, default=1, help="(c): few-shot preambles (1: GSM8K's fixed shots)")
    ap.add_argument("--gen-docs", type=int, default=16, help="(c): documents (prompts) per preamble")
    ap.add_argument("--gen-shots", type=int, default=5, help="(c): examples per preamble")
    ap.add_argument("--gen-shot-len", type=int, default=120, help="(c): ~tokens per example")
    ap.add_argument("--gen-question", default="40-100", help="(c): question tokens, min-max")
    ap.add_argument("--max-gen-toks", type=int, default=32, help="(c): max_gen_toks")
    ap.add_argument("--no-gen-stops", dest="gen_stops", action="store_false",
                    help="(c): no stop strings: every answer runs to max_gen_toks (decode-bound worst case)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="the model's dtype (HFLM takes its log-softmax in it, FastLM in float32)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from ckpteval.evaluation.fast_lm import FastLM

    size = args.size or ("tiny" if args.small else "small")
    args.batch = "auto" if args.batch == "auto" else int(args.batch)
    dtype = DTYPES[args.dtype]
    model = build(size, dtype, args.device)  # both backends compute in the model's dtype
    vocab = model.config.vocab_size
    tok = word_tokenizer(vocab)
    model.generation_config.eos_token_id = tok.eos_token_id
    params = sum(p.numel() for p in model.parameters())
    peak = matmul_peak(dtype, args.device)
    rng = random.Random(1)
    docs = max(1, args.docs)
    print(f"model={size} ({params / 1e6:.0f}M params) {args.dtype} batch={args.batch} device={args.device} "
          f"threads={torch.get_num_threads()} matmul peak {peak / 1e9:.1f} GFLOP/s")

    def pair(max_length=None, tokenizer=tok):
        return (FastLM(model, tokenizer, batch_size=args.batch, max_length=max_length),
                HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch, max_length=max_length))

    def ref(max_length=None, tokenizer=tok):
        """FastLM at --fast-ref-batch (None without it)."""
        if args.fast_ref_batch is None:
            return None
        return FastLM(model, tokenizer, batch_size=args.fast_ref_batch, max_length=max_length)

    def ll_tokens(reqs, lm, shared_prefix_tokens=0):
        """(fast, hf) tokens run: HFLM every context+continuation; FastLM contexts once per distinct context,
        continuations minus one, and (b) the preamble once per group instead of once per document."""
        ctx = {r.args[0]: len(lm.tok_encode(r.args[0])) for r in reqs}
        cont = [len(r.args[1].split()) for r in reqs]
        hf = sum(ctx[r.args[0]] + k - 1 for r, k in zip(reqs, cont))
        fast = sum(ctx.values()) + sum(k - 1 for k in cont) - shared_prefix_tokens
        return {"fast": fast, "hf": hf}

    cases = args.cases.split(",")
    if "a" in cases:
        reqs = mc_requests(rng, vocab, 2 * docs)
        fast, hf = pair()
        run_case("a", fast, hf, "loglikelihood", reqs, ll_tokens(reqs, fast), args, params, peak, ref())
    if "b" in cases:
        groups, shots, shot_len = args.groups, 5, (30 if args.small else 100)
        reqs = fewshot_requests(rng, vocab, groups, docs, shots, shot_len)
        fast, hf = pair()
        pre = shots * shot_len
        run_case("b", fast, hf, "loglikelihood", reqs, ll_tokens(reqs, fast, groups * (docs - 1) * pre), args, params,
                 peak, ref())
    if "c" in cases:
        question = tuple(int(x) for x in args.gen_question.split("-"))
        prompts, pre_tokens = gen_prompts(rng, vocab, args.gen_groups, args.gen_docs, args.gen_shots,
                                          30 if args.small else args.gen_shot_len, question)
        max_gen = args.max_gen_toks
        gen_tok = gen_tokenizer(vocab)  # HFLM adds the EOS text to the stop strings: "w1" would match w12, w1234..
        until = stop_words(model, gen_tok, prompts, max_gen) if args.gen_stops else []
        reqs = [Instance("generate_until", {}, (p, {"until": until, "max_gen_toks": max_gen, "do_sample": False}), i)
                for i, p in enumerate(prompts)]
        fast, hf = pair(tokenizer=gen_tok)
        n_prompt = sum(len(p.split()) for p in prompts)
        print(f"(c) shape: {args.gen_groups} preamble(s) x {args.gen_docs} docs, {args.gen_shots} shots of "
              f"~{30 if args.small else args.gen_shot_len} tokens (preambles {pre_tokens} tokens in all), questions of {args.gen_question} "
              f"tokens, max_gen_toks {max_gen}, stop strings {until}")
        texts = run_case("c", fast, hf, "generate_until", reqs,
                         {"fast": pre_tokens + n_prompt - pre_tokens * args.gen_docs + max_gen * len(prompts),
                          "hf": n_prompt + max_gen * len(prompts)}, args, params, peak,
                         ref(tokenizer=gen_tok))["out"]
        words = sorted(len(t.split()) for t in texts)
        print(f"    answers (words): min {words[0]} median {words[len(words) // 2]} max {words[-1]}; "
              f"{sum(w < max_gen for w in words)}/{len(words)} cut before max_gen_toks; tokens run counted with "
              f"every answer at max_gen_toks (an upper bound)")
    if "d" in cases:
        max_length = 256 if args.small else 1024
        n_docs = 2 * docs if args.rolling == "uniform" else docs
        reqs = rolling_requests(rng, vocab, n_docs, rolling_lengths(rng, args.rolling, n_docs, max_length))
        fast, hf = pair(max_length)
        pad = padded_window_tokens(fast, reqs, args.batch if isinstance(args.batch, int) else 64)  # auto: at most 64
        print(f"(d) {args.rolling}: {len(reqs)} documents, {pad['windows']} windows of max_length {max_length}, "
              f"{pad['real']} input tokens; with padding HFLM runs {pad['hf']}, FastLM {pad['fast']}: "
              f"bound on the ratio {pad['hf'] / pad['fast']:.2f}x")
        n_tok = pad["real"]
        run_case("d", fast, hf, "loglikelihood_rolling", reqs, {"fast": n_tok, "hf": n_tok}, args, params, peak,
                 ref(max_length))


if __name__ == "__main__":
    main()

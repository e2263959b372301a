"""Loss-path benchmark: ckpteval's evaluation loop vs the plain transformers loop, same model, same windows.

    python benchmarks/bench_loss.py                      # ~110M Llama (random weights), float32 + bfloat16
    python benchmarks/bench_loss.py --quick              # tiny model, a smoke run in seconds
    python benchmarks/bench_loss.py --compile --auto     # + ours with eval.compile=true, + ours at eval.batch_size=auto
    python benchmarks/bench_loss.py --size 8b --dtypes bfloat16 --seq 2048 --plain-batches 1,2,4,8,16,32 \
        --auto --compile --device cuda --json out.json  # GPU: the plain loop at ITS best batch, ours there and at auto

The reference is what most training codebases do: `model(input_ids=window, labels=window).loss` per batch under
`torch.no_grad`, which materialises the full (B, L, V) logits and their float32 copy. Rows printed per dtype:

  plain@B     the plain loop at batch B (with --plain-batches, each B until it runs out of memory; best marked *)
  ours@B      ckpteval's loop (`run_eval` + `causal_lm_scorer`) at the plain loop's (best) batch: same windows
  compiled@B  the same with `eval.compile=true` (torch.compile of the decoder; compile time not counted)
  ours@auto   `eval.batch_size=auto`: the probe's batch (its time and memory printed apart)

tokens/s, the ratio to plain@B (best), peak memory above the weights (GPU: max_memory_allocated; CPU: peak RSS
above the post-load baseline via /proc/self/clear_refs), |loss - plain's| on the same windows, and the share of
this machine's matmul peak measured in the same run (model FLOPs per token: `_measure.flops_per_token`). On the CPU
each loop runs in its own process (its peak RSS is its own); on a GPU all run in one process, the allocator's peak
reset between them, a batch that runs out of memory reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import DTYPES, SIZES, build, flops_per_token, matmul_peak, peak_since, reset_peak  # noqa: E402


def windows(n: int, seq: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (n, seq + 1), generator=g)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_loop(model, impl: str, dtype: torch.dtype, batch: int, seq: int, batches: int, device: str,
             budget_gb: float | None = None) -> dict:
    """Time one loop on `model` in this process: tokens/s, peak memory, loss (and for auto the chosen batch)."""
    from ckpteval.evaluation import auto_batch
    from ckpteval.evaluation.loss import causal_lm_scorer, run_eval

    dev = torch.device(device)
    extra: dict = {}
    if impl == "auto":
        from omegaconf import OmegaConf

        cfg = OmegaConf.create({"eval": {"batch_size": "auto", "seq_len": seq, "logits_chunk": 0, "doc_mask": False,
                                         "memory_budget_gb": budget_gb}})
        start = time.perf_counter()
        chosen = auto_batch.loss_batch(cfg, model, causal_lm_scorer(model), 10**9, 1, dev, dtype)
        extra = {"probe_s": time.perf_counter() - start, "chosen": chosen.windows}
        batch = chosen.windows
    data = windows(batch * batches, seq, model.config.vocab_size)
    batch_list = [(data[i:i + batch, :-1], data[i:i + batch, 1:]) for i in range(0, len(data), batch)]
    if impl == "plain":
        def loop(bs):
            total, count = 0.0, 0
            with torch.no_grad():
                for inputs, targets in bs:
                    window = torch.cat([inputs, targets[:, -1:]], dim=1).to(device)
                    loss = model(input_ids=window, labels=window).loss
                    total += loss.double().item() * targets.numel()
                    count += targets.numel()
            return total / count
    else:
        scorer = causal_lm_scorer(model, compile=impl == "compiled")
        if impl == "auto":
            scorer = auto_batch.resilient_scorer(scorer, chosen, dev)

        def loop(bs):
            return run_eval(scorer, bs, device=dev, dtype=dtype, model_dtype=dtype).loss

    start = time.perf_counter()
    loop(batch_list[:1])  # warm-up: allocator, oneDNN/cuBLAS kernel selection (and the compilation)
    _sync(device)
    extra["warmup_s"] = time.perf_counter() - start
    base = reset_peak(device)
    start = time.perf_counter()
    loss = loop(batch_list)
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"impl": impl, "batch": batch, "tokens_per_s": batch * seq * batches / elapsed,
            "peak_bytes": peak_since(device, base), "loss": loss,
            "flops_per_token": flops_per_token(model.config, seq), **extra}


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(args, dtype_name: str) -> list[dict]:
    """Every loop of one dtype: the plain sweep, then ours at the plain loop's best batch, compiled, auto."""
    inproc = args.device.startswith("cuda")
    model = build(args.size, DTYPES[dtype_name], args.device) if inproc else None

    def one(impl: str, batch: int) -> dict | None:
        if not inproc:
            return _child(args, impl, dtype_name, batch)
        try:
            return run_loop(model, impl, DTYPES[dtype_name], batch, args.seq, args.batches, args.device,
                            args.budget_gb)
        except RuntimeError as exc:
            if not _oom(exc):
                raise
        torch.cuda.empty_cache()
        print(f"  {impl}@{batch}: out of memory", flush=True)
        return None

    rows = []
    for b in args.plain_batches:
        r = one("plain", b)
        if r is None:
            break
        rows.append(r)
    if not rows:
        raise SystemExit(f"the plain loop ran out of memory at batch {args.plain_batches[0]}")
    best = max(rows, key=lambda r: r["tokens_per_s"])
    best["best"] = True
    for impl in ["ours"] + (["compiled"] if args.compile else []):
        r = one("ckpteval" if impl == "ours" else impl, best["batch"])
        if r is not None:
            r["impl"] = impl
            rows.append(r)
    if args.auto:
        r = one("auto", 0)
        if r is not None:
            rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--batch", type=int, default=4, help="the batch of both loops (without --plain-batches)")
    ap.add_argument("--plain-batches", default=None, help="comma list: the plain loop at each, until out of memory")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="also ours with eval.compile=true")
    ap.add_argument("--auto", action="store_true", help="also ours at eval.batch_size=auto")
    ap.add_argument("--budget-gb", type=float, help="--auto: eval.memory_budget_gb (default: 0.9 x free GPU memory, "
                    "0.5 x available RAM)")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 batches of 2 x 128")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.size, args.batch, args.seq, args.batches = "tiny", 2, 128, 2
    args.plain_batches = [int(b) for b in args.plain_batches.split(",")] if args.plain_batches else [args.batch]
    if args.child:
        impl, dtype, batch = args.child.split(":")
        model = build(args.size, DTYPES[dtype], args.device)
        print(json.dumps(run_loop(model, impl, DTYPES[dtype], int(batch), args.seq, args.batches, args.device,
                                  args.budget_gb)))
        return
    print(f"model={args.size} seq={args.seq} batches={args.batches} device={_device_name(args.device)} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}", flush=True)
    everything = []
    for dtype_name in args.dtypes.split(","):
        rows = measure(args, dtype_name)
        peak = matmul_peak(DTYPES[dtype_name], args.device)
        best = next(r for r in rows if r.get("best"))
        print(f"{dtype_name}: matmul peak {peak / 1e12:.2f} TFLOP/s")
        print(f"  {'loop':12} {'tok/s':>10} {'vs plain*':>9} {'peak MB':>9} {'|dloss|':>9} {'%peak':>6}  notes")
        for r in rows:
            r["dtype"], r["matmul_peak"] = dtype_name, peak
            r["share_of_peak"] = r["tokens_per_s"] * r["flops_per_token"] / peak
            same = [p for p in rows if p["impl"] == "plain" and p["batch"] == r["batch"]]
            dloss = f"{abs(r['loss'] - same[0]['loss']):9.2e}" if same and r["impl"] != "plain" else f"{'':9}"
            notes = "best plain batch" if r.get("best") else ""
            if r["impl"] == "auto":
                notes = f"probe {r['probe_s']:.1f} s"
            if r["impl"] == "compiled":
                ours = next((o for o in rows if o["impl"] == "ours"), None)
                notes = f"compile+warm-up {r['warmup_s']:.0f} s" + (
                    f"; {r['tokens_per_s'] / ours['tokens_per_s']:.2f}x ours eager" if ours else "")
            name = f"{r['impl']}@{r['batch']}"
            print(f"  {name:12} {r['tokens_per_s']:10.0f} {r['tokens_per_s'] / best['tokens_per_s']:8.2f}x "
                  f"{r['peak_bytes'] / 2**20:9.0f} {dloss} {100 * r['share_of_peak']:5.1f}%  {notes}", flush=True)
        everything += rows
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "seq": args.seq, "batches": args.batches,
                                               "device": _device_name(args.device), "torch": torch.__version__,
                                               "rows": everything}, indent=1))


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else device


def _child(args, impl: str, dtype_name: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{impl}:{dtype_name}:{batch}", "--size", args.size, "--seq",
           str(args.seq), "--batches", str(args.batches), "--device", args.device]
    if args.budget_gb:
        cmd += ["--budget-gb", str(args.budget_gb)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{impl}@{batch} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()

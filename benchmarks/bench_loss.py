"""Loss-path benchmark: ckpteval's evaluation loop vs the plain transformers loop, same model, same windows.

    python benchmarks/bench_loss.py                      # ~110M Llama (random weights), float32 + bfloat16
    python benchmarks/bench_loss.py --quick              # tiny model, a smoke run in seconds

Each measurement runs in its own subprocess so peak memory (GPU: max_memory_allocated; CPU: peak RSS above the
post-load baseline, via /proc/self/clear_refs) belongs to that loop alone. The reference is what most training
codebases do: `model(input_ids=window, labels=window).loss` per batch under `torch.no_grad`, which materialises
the full (B, L, V) logits and their float32 copy. Prints tokens/s, the ratio, peak memory, the loss difference,
and the fraction of this machine's measured matmul peak reached (model FLOPs = 2 * params * tokens).
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

from _measure import DTYPES, SIZES, build, matmul_peak, peak_since, reset_peak  # noqa: E402


def windows(n: int, seq: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (n, seq + 1), generator=g)


def run_one(impl: str, size: str, dtype_name: str, batch: int, seq: int, batches: int, device: str) -> dict:
    """One loop in this process: returns tokens/s, peak memory and the loss."""
    dtype = DTYPES[dtype_name]
    model = build(size, dtype, device)
    data = windows(batch * batches, seq, model.config.vocab_size)
    batches_list = [(data[i:i + batch, :-1], data[i:i + batch, 1:]) for i in range(0, len(data), batch)]
    if impl == "ckpteval":
        from ckpteval.evaluation.loss import causal_lm_scorer, run_eval

        scorer = causal_lm_scorer(model)

        def loop(bs):
            return run_eval(scorer, bs, device=torch.device(device), dtype=dtype, model_dtype=dtype).loss
    else:
        def loop(bs):
            total, count = 0.0, 0
            with torch.no_grad():
                for inputs, targets in bs:
                    window = torch.cat([inputs, targets[:, -1:]], dim=1).to(device)
                    loss = model(input_ids=window, labels=window).loss
                    total += loss.double().item() * targets.numel()
                    count += targets.numel()
            return total / count

    loop(batches_list[:1])  # warm-up: allocator, oneDNN/cuBLAS kernel selection
    base = reset_peak(device)
    start = time.perf_counter()
    loss = loop(batches_list)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters() if p.dim() > 1) - model.config.vocab_size * model.config.hidden_size
    return {"tokens_per_s": batch * seq * batches / elapsed, "peak_bytes": peak_since(device, base), "loss": loss,
            "flops_per_token": 2 * params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 batches of 2 x 128")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.size, args.batch, args.seq, args.batches = "tiny", 2, 128, 2
    if args.child:
        impl, dtype = args.child.split(":")
        print(json.dumps(run_one(impl, args.size, dtype, args.batch, args.seq, args.batches, args.device)))
        return
    print(f"model={args.size} batch={args.batch} seq={args.seq} batches={args.batches} device={args.device} "
          f"threads={torch.get_num_threads()}")
    header = (f"{'dtype':9} {'ours tok/s':>11} {'plain tok/s':>12} {'ratio':>6} {'ours peak MB':>13} "
              f"{'plain peak MB':>14} {'|dloss|':>9} {'ours %peak':>10} {'plain %peak':>11}")
    print(header)
    for dtype_name in args.dtypes.split(","):
        res = {impl: _child(args, impl, dtype_name) for impl in ("ckpteval", "plain")}
        peak = matmul_peak(DTYPES[dtype_name], args.device)
        ours, plain = res["ckpteval"], res["plain"]
        frac = {k: v["tokens_per_s"] * v["flops_per_token"] / peak for k, v in res.items()}
        print(f"{dtype_name:9} {ours['tokens_per_s']:11.0f} {plain['tokens_per_s']:12.0f} "
              f"{ours['tokens_per_s'] / plain['tokens_per_s']:6.2f} {ours['peak_bytes'] / 2**20:13.1f} "
              f"{plain['peak_bytes'] / 2**20:14.1f} {abs(ours['loss'] - plain['loss']):9.2e} "
              f"{100 * frac['ckpteval']:9.1f}% {100 * frac['plain']:10.1f}%   (matmul peak {peak / 1e9:.0f} GFLOP/s)")


def _child(args, impl: str, dtype_name: str) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{impl}:{dtype_name}", "--size", args.size, "--batch",
           str(args.batch), "--seq", str(args.seq), "--batches", str(args.batches), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()

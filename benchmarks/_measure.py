"""What the benchmarks share: the ~100M Llama they time, peak memory of one loop, and the machine's matmul peak."""

from __future__ import annotations

import time
from pathlib import Path

import torch

SIZES = {
    "small": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 2048},
    "tiny": {"vocab_size": 4096, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(size: str, dtype: torch.dtype, device: str):
    """A Llama of `size` with random (seeded) weights, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size], tie_word_embeddings=False))
    return model.to(device=device, dtype=dtype).eval()


def reset_peak(device: str) -> int:
    """Start a peak-memory window; returns the baseline (GPU: allocated bytes; CPU: RSS)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _status_kb("VmRSS") * 1024


def peak_since(device: str, base: int) -> int:
    """Peak bytes above `base` since `reset_peak` (GPU: max_memory_allocated; CPU: VmHWM)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _status_kb("VmHWM") * 1024 - base


def _status_kb(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(name)


def matmul_peak(dtype: torch.dtype, device: str, n: int | None = None) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`, best of several timings (the machine's peak, not its load).

    Through F.linear, the kernel nn.Linear uses (CPU bf16 `a @ b` can take a slower path than oneDNN's linear).
    """
    n = n or (8192 if device.startswith("cuda") else 1024)  # a GPU needs a large product to reach its peak
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.nn.functional.linear(a, b)
    reps = 10
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n ** 3 / best

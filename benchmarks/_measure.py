"""What the benchmarks share: the Llamas they time (random weights), peak memory of one loop, the machine's matmul
peak, and the model FLOPs per token that a share of that peak counts."""

from __future__ import annotations

import time
from pathlib import Path

import torch

SIZES = {
    "small": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 2048},
    "tiny": {"vocab_size": 4096, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512},
    # Llama-3 shapes (Llama-3.2-1B with its head untied, Llama-3.1-8B): built on the device, in its dtype
    "1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
           "rope_theta": 500000.0},
    "8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
           "rope_theta": 500000.0},
}
BIG = {"1b", "8b"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(size: str, dtype: torch.dtype, device: str):
    """A Llama of `size` with random (seeded) weights, in eval mode. The 1B and 8B are initialised where they run,
    in their dtype (an 8B in float32 on the CPU first would take 32 GB and minutes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], tie_word_embeddings=False)
    if size not in BIG:
        return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def flops_per_token(config, seq: int) -> float:
    """Model FLOPs per token of a causal forward over `seq` tokens: 2 x every matmul weight (q, k, v, o, the MLP,
    the vocabulary projection; not the embedding lookup) + causal attention, 2 x 2 x seq/2 x heads x head_dim
    per layer (scores and their product with the values, half the keys on average)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    weights = layers * (h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size) + h * config.vocab_size
    return 2 * weights + layers * 2 * 2 * (seq / 2) * q


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

"""Optimizer, schedule, one optimizer step, and checkpoint state: the pieces `modes/train_eval.py` composes."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # training tokens consumed, all data-parallel ranks together
    data_position: int = 0  # global sample position of the training stream (resume continues here)

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, train_cfg) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `train.steps`."""
    if train_cfg.warmup_steps > 0 and step < train_cfg.warmup_steps:
        return train_cfg.lr * (step + 1) / train_cfg.warmup_steps
    span = max(1, train_cfg.steps - train_cfg.warmup_steps)
    progress = min(1.0, (step - train_cfg.warmup_steps) / span)
    floor = train_cfg.lr * train_cfg.min_lr_ratio
    return floor + 0.5 * (train_cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, train_cfg) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (1-D parameters), as in every modern LM recipe."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach kernels take one tensor kind per list: tensor parallel mixes DTensor and replicated plain params
    foreach = not _mixed_dtensor(decay + no_decay)
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas), foreach=foreach)


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


def _mixed_dtensor(tensors: list[torch.Tensor]) -> bool:
    """Plain tensors beside DTensors, or DTensors on different meshes (2-D: TP shards under FSDP)."""
    kinds = {id(t.device_mesh) if _is_dtensor(t) else None for t in tensors}
    return len(kinds) > 1


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, train_cfg) / train_cfg.lr)


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; training windows are never padded, so the mean is token-weighted."""
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm, clipped to `max_norm` (0 = no clipping).

    All-plain or all-DTensor (FSDP) gradients go through `clip_grad_norm_`, which reduces across the mesh.
    Tensor parallel mixes sharded DTensor gradients with replicated plain ones (embeddings, norms, head: the same
    on every rank), and a pipeline stage holds only its own layers (`model.grad_norm_group`: the stages): there
    the squared norms are summed by hand, the DTensor ones over their mesh, a stage's over the pipeline.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    limit = max_norm if max_norm > 0 else float("inf")
    group = getattr(model, "grad_norm_group", None)
    if group is None and not _mixed_dtensor([p.grad for p in params]):
        norm = torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)
        return norm.full_tensor() if _is_dtensor(norm) else norm
    device = next(model.parameters()).device
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        n = torch.linalg.vector_norm(p.grad.detach(), 2, dtype=torch.float32)
        squares += (n.full_tensor() if _is_dtensor(n) else n).square()
    if group is not None:
        torch.distributed.all_reduce(squares, group=group)
    norm = squares.sqrt()
    scale = min(1.0, limit / (float(norm) + 1e-6))
    if scale < 1.0:
        for p in params:
            p.grad.detach().mul_(scale)
    return norm


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, micro_batches: Iterator,
                   grad_accum: int, *, device: torch.device, autocast_dtype: torch.dtype | None, grad_clip: float,
                   loss_fn: Callable = lm_loss) -> tuple[float, float]:
    """Accumulate `grad_accum` micro-batches, clip, step; returns (mean micro-batch loss, grad norm)."""
    total = 0.0
    for _ in range(grad_accum):
        inputs, targets = next(micro_batches)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        if hasattr(model, "pipeline_step"):  # pipeline parallel: forward and backward run inside the schedule
            with ctx:
                total += model.pipeline_step(inputs, targets) / grad_accum
            continue
        with ctx:
            loss = loss_fn(model, inputs, targets) / grad_accum
        loss.backward()
        total += loss.detach().float().item()
    norm = clip_grad_norm(model, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total, float(norm)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())

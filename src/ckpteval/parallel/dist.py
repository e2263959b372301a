"""Process-group setup from the torchrun environment, and the facts every mode needs about it.

Without torchrun (no WORLD_SIZE), everything runs in one process with no process group. Under torchrun the
backend is nccl on CUDA and gloo on CPU unless `parallel.backend` says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dp_rank: int = 0  # this rank's index among data-parallel replicas
    dp_size: int = 1
    dp_group: Any = None  # process group for data-parallel reductions (None = default/world)
    mesh: Any = None  # DeviceMesh when a parallel layout is active

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str | None, local_rank: int = 0) -> torch.device:
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(parallel_cfg, requested_device: str | None = None) -> DistContext:
    """Initialise the default process group when launched by torchrun; no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size == 1:
        return DistContext(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = parallel_cfg.backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    rank = dist.get_rank()
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       dp_rank=rank, dp_size=world_size)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

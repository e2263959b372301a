"""Process-group setup from the torchrun environment, and the facts every mode needs about it.

Without torchrun (no WORLD_SIZE), everything runs in one process with no process group. Under torchrun the
backend is nccl on CUDA and gloo on CPU unless `parallel.backend` says otherwise. For parallel=fsdp|tp|pp a
("dp", "pp", "tp") DeviceMesh is built after the sizes are validated (before the process group starts, so a
wrong size fails every rank the same way); data-parallel evaluation shards windows over the "dp" dim only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ckpteval.errors import CkptEvalError
from ckpteval.parallel.mesh import MeshDims, build_mesh, resolve_mesh_dims

log = logging.getLogger("ckpteval")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dp_rank: int = 0  # this rank's index among data-parallel replicas
    dp_size: int = 1
    dp_group: Any = None  # process group for data-parallel reductions (None = default/world)
    mesh: Any = None  # DeviceMesh ("dp", "pp", "tp") when a parallel layout is active
    dims: MeshDims | None = None  # its sizes

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
    layout = parallel_cfg.name
    dims = resolve_mesh_dims(parallel_cfg, world_size)  # raises on every rank alike, before any collective
    if layout != "none" and world_size == 1:
        raise CkptEvalError(f"parallel={layout} needs several processes: launch it with torchrun "
                            f"(torchrun --nproc_per_node=N run.py parallel={layout} ...), or use parallel=none")
    device = pick_device(requested_device, local_rank)
    if world_size == 1:
        return DistContext(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = parallel_cfg.backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    rank = dist.get_rank()
    if layout == "none":
        return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                           dp_rank=rank, dp_size=world_size)
    mesh = build_mesh(dims, device.type)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       dp_rank=mesh.get_local_rank("dp"), dp_size=dims.dp, dp_group=mesh.get_group("dp"),
                       mesh=mesh, dims=dims)


@contextlib.contextmanager
def fail_together(what: str):
    """Run the block on every rank; when any rank fails, every rank raises the same CkptEvalError.

    Wrap blocks that contain no collectives, or whose collectives every rank leaves even on failure (DCP load
    gathers its exceptions), so a bad file on one rank ends the whole job with one message instead of a hang.
    """
    message = None
    try:
        yield
    except CkptEvalError as exc:
        message = str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure on one rank must reach the others
        # Not a known user error: possibly a bug. Its traceback goes to the log before it becomes one line.
        log.warning("%s failed on rank %s", what, os.environ.get("RANK", "0"), exc_info=True)
        message = f"{what} failed: {type(exc).__name__}: {exc}"
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if message is not None:
            raise CkptEvalError(message)
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message)
    failed = [(r, m) for r, m in enumerate(gathered) if m is not None]
    if failed:
        rank, msg = failed[0]
        error = CkptEvalError(msg if all(m == msg for _, m in failed) else f"rank {rank}: {msg}")
        error.all_ranks = True  # every rank raises this same error: only rank 0 needs to print it
        raise error


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

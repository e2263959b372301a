"""Mesh sizes: data-parallel x pipeline x tensor-parallel == world size, checked before anything starts.

Every check here is a pure function of the config (and the model's config), so all ranks reach the same verdict
and fail together with the same message, and the unit tests need no process group. The mesh dims are always
("dp", "pp", "tp"), in that order: tensor-parallel peers are neighbouring ranks (same node), data-parallel
replicas are the outermost dim.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckpteval.errors import CkptEvalError

LAYOUTS = ("none", "fsdp", "tp", "pp", "ep")
DIM_NAMES = ("dp", "pp", "tp")


@dataclass(frozen=True)
class MeshDims:
    dp: int
    pp: int
    tp: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dp, self.pp, self.tp)


def resolve_mesh_dims(parallel_cfg, world_size: int) -> MeshDims:
    """(dp, pp, tp) for `parallel_cfg` on `world_size` ranks; parallel.dp=-1 takes what tp x pp leave."""
    name = parallel_cfg.name
    if name not in LAYOUTS:
        raise CkptEvalError(f"parallel={name} is unknown: use one of {', '.join(LAYOUTS)}")
    tp, pp, dp = int(parallel_cfg.tp), int(parallel_cfg.pp), int(parallel_cfg.dp)
    if tp < 1 or pp < 1 or (dp < 1 and dp != -1):
        raise CkptEvalError(f"parallel.tp={tp}, parallel.pp={pp}, parallel.dp={dp}: degrees must be >= 1 "
                            "(parallel.dp=-1 = the ranks tp x pp leave)")
    allowed = {"none": (), "fsdp": (), "tp": ("tp",), "pp": ("pp",), "ep": ("ep",)}[name]
    ep = int(getattr(parallel_cfg, "ep", 1) or 1)
    if ep < 1:
        raise CkptEvalError(f"parallel.ep={ep}: the expert-parallel degree must be >= 1")
    if name == "ep" and world_size % ep != 0:
        raise CkptEvalError(f"world size {world_size} is not divisible by parallel.ep={ep}: launch a multiple of {ep} "
                            "processes (torchrun --nproc_per_node=N) or change the degree")
    for dim, degree in (("tp", tp), ("pp", pp), ("ep", ep)):
        if degree > 1 and dim not in allowed:
            raise CkptEvalError(f"parallel.{dim}={degree} does not apply to parallel={name}: set parallel.{dim}=1, "
                                f"or use parallel={dim} (one layout per job)")
    if world_size % (tp * pp) != 0:
        raise CkptEvalError(f"world size {world_size} is not divisible by parallel.tp={tp} x parallel.pp={pp}: "
                            f"launch a multiple of {tp * pp} processes (torchrun --nproc_per_node=N) or change "
                            "the degrees")
    if dp == -1:
        dp = world_size // (tp * pp)
    if dp * tp * pp != world_size:
        raise CkptEvalError(f"parallel.dp={dp} x parallel.tp={tp} x parallel.pp={pp} = {dp * tp * pp} does not "
                            f"match the world size {world_size}: use parallel.dp=-1 to infer it, or launch "
                            f"{dp * tp * pp} processes")
    return MeshDims(dp=dp, pp=pp, tp=tp)


def check_model_fits(dims: MeshDims, model_config, ep: int = 1) -> None:
    """The model must split evenly: heads, KV heads and the MLP width over tp; decoder layers over pp; experts over
    ep (parallel=ep)."""
    if ep > 1:
        from ckpteval.parallel.ep import check_ep

        check_ep(model_config, ep)
    if dims.tp > 1:
        for attr in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = getattr(model_config, attr, None)
            if value is None and attr == "num_key_value_heads":
                value = getattr(model_config, "num_attention_heads", None)
            if value is not None and value % dims.tp != 0:
                raise CkptEvalError(f"parallel.tp={dims.tp} does not divide the model's {attr}={value}: "
                                    f"choose a tensor-parallel degree that divides it")
    if dims.pp > 1:
        layers = getattr(model_config, "num_hidden_layers", None)
        if layers is not None and dims.pp > layers:
            raise CkptEvalError(f"parallel.pp={dims.pp} pipeline stages but the model has only "
                                f"num_hidden_layers={layers}: use parallel.pp={layers} or fewer")


def check_microbatches(batch_size: int, microbatches: int, what: str = "eval.batch_size") -> None:
    """A pipeline splits each batch into `microbatches` equal parts."""
    if microbatches < 1:
        raise CkptEvalError(f"parallel.microbatches={microbatches} is invalid: use 1 or more")
    if batch_size % microbatches != 0:
        raise CkptEvalError(f"{what}={batch_size} is not divisible by parallel.microbatches={microbatches}: "
                            f"use a batch size that is a multiple of it (or fewer microbatches)")


def split_layers(num_layers: int, stages: int) -> list[range]:
    """Contiguous decoder-layer slices per stage, as even as possible (earlier stages take the remainder)."""
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def build_mesh(dims: MeshDims, device_type: str):
    """The ("dp", "pp", "tp") DeviceMesh over all ranks (the default process group must exist)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, dims.shape, mesh_dim_names=DIM_NAMES)

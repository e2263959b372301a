"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3), evaluated without a zero_to_fp32 step.

    ckpt=out/checkpoint-500                          # HF Trainer + DeepSpeed: checkpoint-N/latest + global_step500/
    ckpt=run/ds                                      # engine.save_checkpoint(DIR): DIR/latest + DIR/global_stepN/
    ckpt=run/ds/global_step500                       # one tag dir
    ckpt=out/checkpoint-500 ckpt_format=deepspeed    # ZeRO-1/2 Trainer dirs also hold model.safetensors (read as
                                                     # an HF dir by default): the fp32 partitions instead

A tag dir as DeepSpeed writes it (`_save_checkpoint` + `_save_zero_checkpoint`):
- ZeRO-1/2: `mp_rank_00_model_states.pt` (the module's state dict in the training dtype, `param_shapes`,
  `shared_params`, `buffer_names`, frozen parameters, `dp_world_size`, `ds_config`) and, per data-parallel rank r,
  `zero_pp_rank_{r}_mp_rank_00_optim_states.pt` whose `single_partition_of_fp32_groups` is rank r's slice of each
  param group's flat fp32 master weights;
- ZeRO-3: `zero_pp_rank_{r}_mp_rank_00_model_states.pt` per rank (the module holds only empty placeholders) and
  `..._optim_states.pt` whose `fp32_flat_groups` hold rank r's ceil(numel / world) elements of every parameter;
- `bf16_zero_pp_rank_*` optimizer files from the bf16 optimizer, laid out like ZeRO-1/2.

The fp32 weights are rebuilt the way DeepSpeed's own `deepspeed/utils/zero_to_fp32.py` does: each rank's flat
partitions stitched in `param_shapes` order, alignment padding dropped, shared (tied) parameters re-pointed, frozen
parameters from their saved fragments. With no fp32 partitions saved (ZeRO stage 0), the model states' own weights
are read instead; the log line says which. Only model weights are materialised: the optimizer files are memory-mapped
and only their fp32 groups are touched (Adam's moments never are), so memory peaks at about one fp32 copy of the
model.

No DeepSpeed code is imported or called: every file goes through `safe_pickle.torch_load` (DeepSpeed's own loader
uses plain torch.load), where DeepSpeed's classes inside the optimizer pickles (LossScaler, ZeroStageEnum,
fragment_address) become inert stand-ins and any other global is refused.

Complete when `latest` beside the tag dir names it (DeepSpeed writes it after every rank saved; an older tag of a
bare save dir is complete when `latest` names a later step) and every rank's file is there, the world size coming
from the model states' `dp_world_size`. Architecture: config.json in the tag dir, its checkpoint-N (the Trainer writes
one) or the run's output dir, else `ckpt_config=PATH`, else the `model` group, checked against `param_shapes`.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckpteval.checkpoint.formats import _common
from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError

log = logging.getLogger(__name__)

LATEST = "latest"
STAGE12_MODEL = "mp_rank_00_model_states.pt"
RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")
OTHER_MODEL_FILE = re.compile(r"^(?:mp_rank_(\d+)_model_states|layer_\d+-model_\d+-model_states)\.pt$")
TRAILING_NUMBER = re.compile(r"(\d+)$")
RUN_LEVELS = 2  # global_stepN -> checkpoint-N (or the save dir) -> the run's output dir


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(p.name.endswith("_model_states.pt") for p in path.iterdir())


def _tag_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if _is_tag_dir(p)) if path.is_dir() else []


def _step(tag: str) -> int | None:
    match = TRAILING_NUMBER.search(tag)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------- reading safely


def read_ds_file(path: Path) -> dict:
    """A DeepSpeed `*_states.pt` through the allow-list, memory-mapped (tensors are paged in only when touched):
    DeepSpeed's own classes become inert stand-ins, anything else not plain data is refused before it is called."""
    import zipfile

    from ckpteval.checkpoint.safe_pickle import torch_load

    data = torch_load(path, inert=("deepspeed.", "numpy."), mmap=zipfile.is_zipfile(path))
    if not isinstance(data, dict):
        raise CkptEvalError(f"DeepSpeed checkpoint file {path} holds a {type(data).__name__}, not DeepSpeed's state "
                            "dict: it is not a DeepSpeed checkpoint")
    return data


@dataclass
class Layout:
    """What a tag dir holds, from its file names and rank 0's model states."""

    stage: int
    world: int  # data-parallel ranks (= ZeRO partitions)
    model_files: list[Path]  # rank order; one file for stages 0-2
    optim_files: list[Path]  # rank order; [] when no ZeRO optimizer partitions were saved (stage 0)
    meta: dict  # rank 0's model states


def layout(path: Path) -> Layout:
    """The stage, world size and every rank's files of a tag dir; raises naming a missing or unread file."""
    names = sorted(p.name for p in path.iterdir())
    ranks: dict[str, dict[int, Path]] = {"model": {}, "optim": {}}
    for name in names:
        match = RANK_FILE.match(name)
        if match:
            if int(match.group(2)) != 0:
                raise _model_parallel(path, name)
            ranks[match.group(3)][int(match.group(1))] = path / name
        elif OTHER_MODEL_FILE.match(name) and name != STAGE12_MODEL:
            raise _model_parallel(path, name)
    first = path / STAGE12_MODEL if (path / STAGE12_MODEL).is_file() else ranks["model"].get(0)
    if first is None:
        raise CkptEvalError(f"DeepSpeed checkpoint {path} is incomplete: neither {STAGE12_MODEL} nor "
                            "zero_pp_rank_0_mp_rank_00_model_states.pt is there (still being written?)")
    meta = read_ds_file(first)
    if (_common.int_or_none(meta.get("mp_world_size")) or 1) > 1:
        raise _model_parallel(path, first.name)
    ds_config = meta.get("ds_config") if isinstance(meta.get("ds_config"), dict) else {}
    zero = ds_config.get("zero_optimization") if isinstance(ds_config.get("zero_optimization"), dict) else {}
    stage = _common.int_or_none(zero.get("stage"))
    if stage is None:  # an older save without its config: the file names say which
        stage = 3 if ranks["model"] else 1 if ranks["optim"] else 0
    world = _common.int_or_none(meta.get("dp_world_size")) or max(len(ranks["optim"]), len(ranks["model"]), 1)
    needed = {"optim": stage >= 1 or bool(ranks["optim"]), "model": stage == 3}
    for kind, files in ranks.items():
        extra = sorted(r for r in files if r >= world)
        if extra:
            raise CkptEvalError(f"DeepSpeed checkpoint {path} holds {kind} states of rank {extra[0]} but {first.name} "
                                f"says {world} data-parallel rank(s): files of two runs are mixed in one dir")
        missing = [r for r in range(world) if r not in files] if needed[kind] else []
        if missing:
            raise CkptEvalError(f"DeepSpeed checkpoint {path} is incomplete: the {kind} states of rank {missing[0]} "
                                f"(zero_pp_rank_{missing[0]}_mp_rank_00_{kind}_states.pt) are missing; ZeRO-{stage} "
                                f"over {world} rank(s) ({first.name}) needs every rank's file")
    model_files = [ranks["model"][r] for r in range(world)] if stage == 3 else [first]
    optim_files = [ranks["optim"][r] for r in range(world)] if ranks["optim"] else []
    return Layout(stage, world, model_files, optim_files, meta)


def _model_parallel(path: Path, name: str) -> CkptEvalError:
    return CkptEvalError(f"DeepSpeed checkpoint {path} is model-parallel ({name}: tensor or pipeline parallel), "
                         "which is not read here: convert it with DeepSpeed's ds_to_universal.py, or save it with "
                         "data parallelism only")


# ---------------------------------------------------------------------------------------------- reconstruction


def _param_shapes(meta: dict) -> list[dict[str, tuple[int, ...]]]:
    groups = meta.get("param_shapes")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CkptEvalError("DeepSpeed model states have no param_shapes: not a ZeRO checkpoint this reader knows")
    return [{name: tuple(shape) for name, shape in g.items()} for g in groups]


def _rank_groups(files: list[Path], stage: int):
    """(rank, its flat fp32 groups, its optimizer state dict) one rank at a time: each file is memory-mapped and only
    its fp32 groups are read; the caller copies them out before the next rank's file is opened, so the mapped pages
    (which count in RSS while mapped) never exceed one rank's partition."""
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    for rank, path in enumerate(files):
        state = read_ds_file(path).get("optimizer_state_dict")
        groups = state.get(key) if isinstance(state, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, torch.Tensor) for g in groups):
            raise CkptEvalError(f"DeepSpeed optimizer states {path} have no {key}: not a ZeRO-{stage} checkpoint's "
                                "optimizer file")
        yield rank, [g.detach() for g in groups], state
        del state, groups  # unmaps this rank's file before the next one is opened


def _mismatch(path: Path, what: str) -> CkptEvalError:
    return CkptEvalError(f"DeepSpeed checkpoint {path}: {what}: the optimizer and model states do not belong together")


def _zero12_params(shapes: list[dict], files: list[Path], stage: int, path: Path) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: each param group's flat fp32 vector is the ranks' equal partitions end to end; parameters lie in it
    in `param_shapes` order (with `param_alignment_paddings` between them where DeepSpeed recorded some)."""
    world = len(files)
    flats: list[torch.Tensor] = []
    paddings = None
    for rank, groups, state in _rank_groups(files, stage):
        if rank == 0:
            if len(groups) != len(shapes):
                raise _mismatch(path, f"{len(groups)} fp32 param groups for {len(shapes)} groups of param_shapes")
            flats = [torch.empty(world * g.numel(), dtype=g.dtype) for g in groups]  # the one fp32 copy
            paddings = state.get("param_alignment_paddings")
        for flat, group in zip(flats, groups):
            part = flat.numel() // world
            if group.numel() != part:
                raise _mismatch(path, f"rank {rank}'s partition has {group.numel()} elements, rank 0's {part}")
            flat[rank * part:(rank + 1) * part].copy_(group)
    out: dict[str, torch.Tensor] = {}
    for g, (group_shapes, flat) in enumerate(zip(shapes, flats)):
        pads = paddings[g] if paddings is not None else [0] * len(group_shapes)
        offset = 0
        for (name, shape), pad in zip(group_shapes.items(), pads):
            numel = math.prod(shape)
            if offset + numel > flat.numel():
                raise _mismatch(path, f"param group {g} has {flat.numel()} fp32 elements, too few for its params")
            out[name] = flat.narrow(0, offset, numel).view(shape)
            offset += numel + pad
        align = 2 * world  # ZeRO-2 pads each group to a multiple of 2 * world (zero_to_fp32's sanity check)
        if math.ceil(offset / align) != math.ceil(flat.numel() / align):
            raise _mismatch(path, f"param group {g} has {flat.numel()} fp32 elements but its params need {offset}")
    return out


def _zero3_params(shapes: list[dict], files: list[Path], path: Path) -> dict[str, torch.Tensor]:
    """ZeRO-3: every parameter is split into `world` pieces of ceil(numel / world) elements (the last padded); each
    rank's flat groups hold its piece of every parameter in `param_shapes` order, crossing group boundaries."""
    world = len(files)
    flat_shapes = {name: shape for group in shapes for name, shape in group.items()}
    parts = {name: math.ceil(math.prod(shape) / world) for name, shape in flat_shapes.items()}
    padded = {name: torch.empty(world * part, dtype=torch.float32) for name, part in parts.items()}
    for rank, groups, _ in _rank_groups(files, 3):
        bounds = [0]
        for t in groups:
            bounds.append(bounds[-1] + t.numel())
        if bounds[-1] != sum(parts.values()):
            raise _mismatch(path, f"rank {rank}'s fp32 partitions hold {bounds[-1]} elements but param_shapes need "
                                  f"{sum(parts.values())}")
        offset = 0
        for name, part in parts.items():
            at = rank * part
            for piece in _span(groups, bounds, offset, part):
                padded[name][at:at + piece.numel()].copy_(piece)
                at += piece.numel()
            offset += part
    return {name: padded[name][:math.prod(shape)].view(shape) for name, shape in flat_shapes.items()}


def _span(groups: list[torch.Tensor], bounds: list[int], start: int, length: int) -> list[torch.Tensor]:
    """Elements [start, start + length) of one rank's flat groups seen end to end (views, no copy)."""
    pieces, end = [], start + length
    for g, tensor in enumerate(groups):
        lo, hi = max(start, bounds[g]), min(end, bounds[g + 1])
        if lo < hi:
            pieces.append(tensor.detach()[lo - bounds[g]: hi - bounds[g]])
    return pieces


def _frozen_params(lay: Layout, metas: list[dict]) -> dict[str, torch.Tensor]:
    shapes = lay.meta.get("frozen_param_shapes") or {}
    out = {}
    for name, shape in shapes.items():
        numel = math.prod(tuple(shape))
        if lay.stage == 3:  # each rank's model states hold its fragment
            frags = [m["frozen_param_fragments"][name].detach() for m in metas]
            out[name] = torch.cat(frags)[:numel].view(tuple(shape))
        else:
            out[name] = lay.meta["frozen_param_fragments"][name].reshape(tuple(shape))
    return out


class DeepSpeedFormat(CheckpointFormat):
    name = "deepspeed"
    description = ("a DeepSpeed ZeRO checkpoint (global_stepN/ with *_model_states.pt + *_optim_states.pt, the dir "
                   "holding it and `latest`, or an HF Trainer checkpoint-N with both)")

    # ------------------------------------------------------------------ cheap questions

    def looks_like(self, path: Path) -> bool:
        return path.is_dir() and (_is_tag_dir(path) or bool(_tag_dirs(path)))

    def resolve(self, path: Path) -> Path:
        if _is_tag_dir(path) or not (path / LATEST).is_file():
            return path
        tag = (path / LATEST).read_text().strip()
        return path / tag if tag and _is_tag_dir(path / tag) else path

    def check_complete(self, path: Path) -> None:
        if not _is_tag_dir(path):  # a save dir whose `latest` does not name a tag dir of its own
            if (path / LATEST).is_file():
                tag = (path / LATEST).read_text().strip()
                raise CkptEvalError(f"DeepSpeed checkpoint {path} is incomplete: `latest` names {tag!r}, which is "
                                    "not a tag dir there (still being written?)")
            raise CkptEvalError(f"DeepSpeed checkpoint {path} is incomplete: no `latest` file naming one of its tags "
                                f"({', '.join(_tag_dirs(path))}); DeepSpeed writes it after every rank saved (still "
                                "being written, or point ckpt= at the tag dir)")
        self._check_latest(path)
        layout(path)

    def _check_latest(self, path: Path) -> None:
        latest = path.parent / LATEST
        if not latest.is_file():
            raise CkptEvalError(f"DeepSpeed checkpoint {path} is incomplete: no `latest` file beside it naming "
                                f"{path.name} (DeepSpeed writes it after every rank saved: still being written?)")
        tag = latest.read_text().strip()
        if tag == path.name:
            return
        named, mine = _step(tag), _step(path.name)
        if named is not None and mine is not None and named > mine:
            return  # `latest` names a later save: saves run one after the other, so this one had finished
        raise CkptEvalError(f"DeepSpeed checkpoint {path} is incomplete: {latest} names {tag!r}, not {path.name!r} "
                            "(this tag is still being written, or is left from a crashed save)")

    def step_tokens(self, path: Path) -> tuple[int | None, int | None]:
        step, tokens = _common.metadata_step_tokens(path.parent)  # the Trainer's checkpoint-N/trainer_state.json
        if step is None:
            step = _common.int_or_none(layout(path).meta.get("global_steps"))
        return step, tokens

    def tokenizer_dirs(self, path: Path) -> list[Path]:
        return _common.run_dirs(path, RUN_LEVELS)

    # ------------------------------------------------------------------ architecture and tensors

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        found = _common.config_dir(*_common.run_dirs(path, RUN_LEVELS))
        if found is not None:
            arch = _common.config_json_arch(found)
        else:
            arch = _common.model_group_arch(model_cfg, path, "DeepSpeed", "no config.json in it, its checkpoint dir "
                                                                        "or the run's output dir")
        _common.check_shapes(arch.config, self.tensor_specs(path, arch.config), arch.source, path)
        return arch

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]]:
        lay = layout(path)
        shapes = _raw_shapes(lay)
        return {name[len(_common.hf_prefix(shapes)):]: shape for name, shape in shapes.items()}

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        lay = layout(path)
        raw = self._raw_state(path, lay)
        prefix = _common.hf_prefix(raw)
        return {name[len(prefix):]: t for name, t in raw.items()}

    def _raw_state(self, path: Path, lay: Layout) -> dict[str, Any]:
        module = _module(lay.meta)
        buffers = {n: module[n] for n in lay.meta.get("buffer_names") or () if n in module}
        if not lay.optim_files:
            if lay.stage == 3:
                raise CkptEvalError(f"DeepSpeed ZeRO-3 checkpoint {path} has no *_optim_states.pt: its model states "
                                    "hold only placeholders, so the weights cannot be rebuilt")
            dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in module.values()})
            log.info("DeepSpeed checkpoint %s: the model states' own weights (%s) in %s: no fp32 optimizer partitions "
                     "were saved", path.name, "/".join(dtypes), lay.model_files[0].name)
            return dict(module)
        shapes = _param_shapes(lay.meta)
        if lay.stage == 3:
            params = _zero3_params(shapes, lay.optim_files, path)
        else:
            params = _zero12_params(shapes, lay.optim_files, lay.stage, path)
        metas = [lay.meta] + [read_ds_file(f) for f in lay.model_files[1:]] if lay.meta.get("frozen_param_shapes") \
            else [lay.meta]
        log.info("DeepSpeed checkpoint %s: fp32 weights rebuilt from the ZeRO-%d optimizer partitions of %d rank(s), "
                 "as zero_to_fp32 does", path.name, lay.stage, lay.world)
        state = {**buffers, **_frozen_params(lay, metas), **params}
        for name, source in (lay.meta.get("shared_params") or {}).items():  # tied weights saved once
            if source in state:
                state[name] = state[source]
        return state


def _raw_shapes(lay: Layout) -> dict[str, tuple[int, ...]]:
    """{saved name: shape} of every tensor `read_state` returns, from rank 0's model states alone."""
    module = _module(lay.meta)
    if not lay.optim_files:
        return {n: tuple(t.shape) for n, t in module.items()}
    shapes = {n: tuple(t.shape) for n in lay.meta.get("buffer_names") or () if (t := module.get(n)) is not None}
    shapes.update({n: tuple(s) for n, s in (lay.meta.get("frozen_param_shapes") or {}).items()})
    for group in _param_shapes(lay.meta):
        shapes.update(group)
    for name, source in (lay.meta.get("shared_params") or {}).items():
        if source in shapes:
            shapes[name] = shapes[source]
    return shapes


def _module(meta: dict) -> dict[str, torch.Tensor]:
    """The model states' `module` state dict (its tensors; under ZeRO-3 only empty placeholders)."""
    module = meta.get("module")
    return {k: v for k, v in module.items() if isinstance(v, torch.Tensor)} if isinstance(module, dict) else {}

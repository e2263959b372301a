"""Model layouts: one function builds the evaluation model (and its scorer) for `parallel.name`.

`none` is a full replica per rank (plain data parallel when launched by torchrun); `fsdp` shards parameters
over the data-parallel ranks (fsdp.py); `tp` splits each decoder layer over the "tp" dim and replicates over
the rest (tp.py); `pp` gives each "pp" rank a slice of the layers (pp.py); `ep` splits the experts of a MoE model
over groups of `parallel.ep` ranks and replicates the rest (ep.py). Modes never branch on the layout:
they get a model and a scorer and call the same `run_eval`.

Weights: families whose checkpoint is a DCP dir with HF names (`sharded_dcp_prefix`) are read straight into the
sharded model, each rank reading only its own shards (and never the optimizer state); every other family (HF,
GGUF, nanoGPT, Lightning, ...) is read whole (model tensors only) on every rank and then laid out. Either way the
architecture is checked against the checkpoint's tensor metadata on the `meta` device before allocating.
"""

from __future__ import annotations

import torch
from torch import nn

from ckpteval.dtypes import torch_dtype
from ckpteval.errors import CkptEvalError
from ckpteval.evaluation.loss import Scorer, causal_lm_scorer, document_sep_id
from ckpteval.parallel.dist import DistContext, fail_together


def load_eval_model(cfg, info, dist: DistContext) -> tuple[nn.Module, Scorer]:
    """Build the model for `cfg.parallel.name`, load the checkpoint's weights into it, return it + its scorer.

    The returned model is the transformers model (its `.config`, `.parameters()`, `.eval()` are what modes use);
    the scorer runs it in its layout.
    """
    from ckpteval.checkpoint import load_model

    dtype = torch_dtype(cfg.eval.dtype)
    layout = cfg.parallel.name
    if layout == "none":
        model = load_model(info, cfg.model, device=dist.device, dtype=dtype, shared_base=True)  # read only
        return model, causal_lm_scorer(model, cfg.eval.logits_chunk, document_sep_id(cfg.eval, model.config),
                                       compile=bool(cfg.eval.get("compile", False)))
    if dist.mesh is None:
        raise CkptEvalError(f"parallel={layout} needs torchrun: torchrun --nproc_per_node=N run.py ...")
    from ckpteval.parallel.mesh import check_model_fits

    with fail_together(f"loading {info.path}"):
        # Local work only (no collectives) until the layout is applied: a bad file fails every rank together.
        model = _unsharded_model(cfg, info, dtype)
        check_model_fits(dist.dims, model.config, int(cfg.parallel.ep) if layout == "ep" else 1)
        doc_sep = document_sep_id(cfg.eval, model.config)
        if layout == "pp":
            from ckpteval.parallel.mesh import check_microbatches
            from ckpteval.parallel.pp import build_stage

            check_microbatches(cfg.eval.batch_size, cfg.parallel.microbatches)
            stage = build_stage(model, dist.mesh.get_local_rank("pp"), dist.dims.pp, doc_sep)
    if layout == "fsdp":
        from ckpteval.parallel.fsdp import apply_fsdp

        root = apply_fsdp(model, dist.mesh["dp"], cfg.parallel, cfg.eval.logits_chunk, doc_sep)
        _load_weights(model, info, dist, no_dist=False)
        return model.eval(), root.scorer()
    if layout == "ep":
        from ckpteval.parallel.ep import apply_ep

        apply_ep(model.to(dist.device), int(cfg.parallel.ep), dist.device.type, dist.mesh["tp"])
        _load_weights(model, info, dist, no_dist=False)
        return model.eval(), causal_lm_scorer(model, cfg.eval.logits_chunk, doc_sep)
    if layout == "tp":
        from ckpteval.parallel.tp import apply_tp

        apply_tp(model.to(dist.device), dist.mesh["tp"])
        _load_weights(model, info, dist, no_dist=False)
        return model.eval(), causal_lm_scorer(model, cfg.eval.logits_chunk, doc_sep)
    from ckpteval.parallel.pp import pipeline_scorer

    stage.to(dist.device)
    _load_weights(stage.lm, info, dist, no_dist=True)
    stage.eval()
    scorer = pipeline_scorer(stage, cfg.parallel, cfg.eval, dist.dims, dist.mesh, dist.device, dtype)
    return stage.lm, scorer


def _reads_sharded(info) -> bool:
    return info.dcp_prefix is not None


def _unsharded_model(cfg, info, dtype: torch.dtype) -> nn.Module:
    """Sharded-DCP families: the validated architecture only; weights come after sharding, straight from the
    checkpoint's shards. Every other family: the whole model with its weights (on CPU)."""
    from ckpteval.checkpoint import load_model
    from ckpteval.checkpoint.load import validated_model

    if _reads_sharded(info):
        return validated_model(info, cfg.model, device="cpu", dtype=dtype)
    return load_model(info, cfg.model, device="cpu", dtype=dtype)


def _load_weights(model: nn.Module, info, dist: DistContext, no_dist: bool) -> None:
    if _reads_sharded(info):
        load_dcp_into(model, info, no_dist=no_dist)


def load_dcp_into(model: nn.Module, info, no_dist: bool = False) -> None:
    """Read the model's tensors from a DCP checkpoint into `model` as it is laid out (plain, FSDP or TP).

    The request is the model's own (sharded) state dict under the checkpoint's prefix, so each rank reads only
    the bytes of its shards; optimizer and other trainer entries are never requested. Names and global shapes
    are checked against `.metadata` first (same checks and messages as the unsharded loader).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    from ckpteval.checkpoint.formats._dcp import match_dcp_keys
    from ckpteval.checkpoint.safe_pickle import safe_filesystem_reader

    state = get_model_state_dict(model)
    names = match_dcp_keys(info, model, state)  # model name -> checkpoint key
    request = {key: state[name] for name, key in names.items()}
    with fail_together(f"reading DCP checkpoint {info.path}"):
        dcp.load(request, storage_reader=safe_filesystem_reader(info.path), no_dist=no_dist)
    set_model_state_dict(model, {name: request[key] for name, key in names.items()},
                         options=StateDictOptions(strict=False))


def parallelize_for_training(model: nn.Module, cfg, dist: DistContext) -> nn.Module:
    """Lay out a freshly built model for `train_eval`: parallel=fsdp (sharded data parallel over all ranks),
    parallel=tp (tensor parallel in groups of parallel.tp ranks, FSDP over the "dp" dim when there are several
    groups) or parallel=pp (pipelines of parallel.pp stages, each stage FSDP-sharded over "dp" when there are
    several pipelines); ranks of one tp group or pipeline see the same batches. One layout per job: the mesh
    validation refuses tp x pp.

    Returns the module the training loop calls; its `.module` (fsdp, pp) or itself (tp) is the transformers
    model (full-model tensor names for checkpoints).
    """
    from ckpteval.parallel.mesh import check_model_fits

    layout = cfg.parallel.name
    if layout not in ("fsdp", "tp", "pp"):
        raise CkptEvalError(f"mode=train_eval does not train with parallel={layout}: use none, fsdp, tp or pp")
    if dist.mesh is None:
        raise CkptEvalError(f"parallel={layout} needs torchrun: torchrun --nproc_per_node=N run.py ...")
    check_model_fits(dist.dims, model.config)
    doc_sep = document_sep_id(cfg.eval, model.config)
    if layout == "tp":
        from ckpteval.parallel.tp import apply_tp

        apply_tp(model.to(dist.device), dist.mesh["tp"])
        if dist.dims.dp == 1:
            return model
        from ckpteval.parallel.fsdp import apply_fsdp  # tp x dp: FSDP over "dp" on top of the TP shards (2-D)

        return apply_fsdp(model, dist.mesh["dp"], cfg.parallel, cfg.eval.logits_chunk, doc_sep)
    if layout == "pp":
        from ckpteval.parallel.pp import PipelineTrainer, build_stage

        stage = build_stage(model, dist.mesh.get_local_rank("pp"), dist.dims.pp, doc_sep).to(dist.device)
        return PipelineTrainer(stage, cfg, dist.dims, dist.mesh, dist.device)
    from ckpteval.parallel.fsdp import apply_fsdp

    return apply_fsdp(model, dist.mesh["dp"], cfg.parallel, cfg.eval.logits_chunk, doc_sep)


def training_scorer(model: nn.Module, logits_chunk: int, doc_sep: int | None = None) -> Scorer:
    """The scorer for a model laid out by `parallelize_for_training` (or plain / DDP-wrapped)."""
    from ckpteval.parallel.fsdp import ShardedCausalLM
    from ckpteval.parallel.pp import PipelineTrainer

    if isinstance(model, (ShardedCausalLM, PipelineTrainer)):
        return model.scorer()
    return causal_lm_scorer(getattr(model, "module", model), logits_chunk, doc_sep)

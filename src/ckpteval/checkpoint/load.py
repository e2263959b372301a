"""Build the architecture a checkpoint holds and load its weights (model only: never optimizer state).

One path for every family (see `checkpoint/formats/`): the family names the architecture and where it came from
(logged once), the model is first built on the `meta` device and its tensor names and shapes are checked
against the family's `tensor_specs` (metadata only), and only then is real memory allocated and the family's
`read_state` loaded. Families speak their checkpoint's layout (for HF dirs the hub's names, e.g. per-expert MoE
tensors); `load_converted` turns it into the model's parameters with transformers' own weight conversion (what
`from_pretrained` applies), for the meta check and the real load alike. A config that contradicts the checkpoint
(a vocab_size of 2e9, another hidden size) is one clear error naming both, in about a second, whatever size it
claims.

An adapter (`info.base` set, e.g. a PEFT LoRA dir) goes the same way: its base is loaded by this path like any
checkpoint, then the adapter family merges itself in (its tensors checked against the base's architecture on
`meta` first). With `shared_base=True` the base comes from `base_cache`: loaded once per process, the previous
adapter undone exactly, for callers that only read the model (loss, the in-memory harness).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ckpteval.checkpoint.formats._common import CKPT_CONFIG_SOURCE, LoadVerdict, ckpt_config_arch, load_converted
from ckpteval.checkpoint.formats._moe import apply_routing
from ckpteval.checkpoint.formats.base import Architecture
from ckpteval.checkpoint.info import CheckpointInfo
from ckpteval.errors import CkptEvalError

log = logging.getLogger(__name__)


def build_config(info: CheckpointInfo, model_cfg=None):
    """The transformers config of the checkpoint (logged once): for an adapter, its base's with the adapter's
    changes (the adapter's tensors checked against it); else `ckpt_config=` when the user named one; else the
    family's first architecture source."""
    if info.base is not None:
        base = Architecture(build_config(info.base, model_cfg), info.base.arch_source or str(info.base.path))
        arch = info.family.adapted_architecture(info.path, base)
    elif info.ckpt_config is not None:
        arch = ckpt_config_arch(info.ckpt_config)
    else:
        arch = info.family.architecture(info.path, model_cfg)
    if info.arch_source != arch.source:
        log.info("architecture of %s (%s): %s", info.path.name, info.format, arch.source)
    info.arch_source = arch.source
    return arch.config


def build_model(config, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                init_weights: bool = True) -> nn.Module:
    """A causal LM for `config` on `device` in `dtype`, randomly initialised; with `init_weights=False` its
    parameters are left as allocated, for a caller that writes every one of them next (buffers computed in the
    constructor, such as rotary frequencies, are computed either way). The random init of weights that are
    overwritten anyway costs ~2 s per checkpoint for a 134M model on CPU."""
    from transformers import AutoModelForCausalLM

    with torch.device(device), (contextlib.nullcontext() if init_weights else _no_init_weights()):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        apply_routing(model)  # a trainer's router no transformers class has (formats/_moe.py), when config says so
    return model


def _no_init_weights():
    """transformers' own switch for "weights are loaded next" (what from_pretrained uses), where it has one."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _mismatch(info: CheckpointInfo, what: str) -> CkptEvalError:
    source = info.arch_source or ""
    fix = ("describe the checkpoint with model.* overrides (or put its config.json beside it, or pass "
           "ckpt_config=PATH)" if source.startswith("the `model` group") else
           "ckpt_config= names a different model than the checkpoint's tensors: point it at the run's own config.json"
           if source.startswith(CKPT_CONFIG_SOURCE) else
           "the architecture source describes a different model than the checkpoint's tensors")
    return CkptEvalError(f"checkpoint {info.path} does not match its architecture from {info.arch_source}: {what}: "
                         f"{fix}")


def check_specs(model: nn.Module, specs: dict[str, tuple[int, ...]], info: CheckpointInfo) -> None:
    """Names and shapes of the checkpoint's tensors (its own layout) against `model` on the `meta` device, after
    transformers' own weight conversion (`load_converted`); tied heads may be absent."""
    raise_on(load_converted(model, {k: torch.empty(tuple(v), device="meta") for k, v in specs.items()}), info,
             list(specs))


def raise_on(verdict: LoadVerdict, info: CheckpointInfo, names: list[str]) -> None:
    """One error naming what does not fit (shapes first, then missing / unexpected names)."""
    if verdict.wrong:
        items = list(verdict.wrong.items())
        shown = ", ".join(f"{k} {found} vs {want}" for k, (found, want) in items[:3])
        fused = any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k, _ in items)
        why = (" (MoE experts as transformers fuses the checkpoint's per-expert tensors: one is missing, or the "
               "config counts another number of them)") if fused else ""
        raise _mismatch(info, f"tensor shape mismatch (checkpoint vs architecture) for {shown}"
                              f"{' ...' if len(items) > 3 else ''}{why}")
    if verdict.missing or verdict.unexpected:
        holds = f"; it holds e.g. {names[:3]}"
        parts = [f"{len(found)} {what} tensor(s) (e.g. {found[0]}{holds if what == 'missing' else ''})"
                 for what, found in (("missing", verdict.missing), ("unexpected", verdict.unexpected)) if found]
        raise _mismatch(info, ", ".join(parts))


def validated_model(info: CheckpointInfo, model_cfg=None, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, init_weights: bool = True) -> nn.Module:
    """The checkpoint's architecture, checked against its tensors on the `meta` device first, then built for
    real (random weights, or none with `init_weights=False`: the caller reads the checkpoint into it)."""
    config = build_config(info, model_cfg)
    try:
        meta = build_model(config, "meta", dtype)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise CkptEvalError(f"the architecture of {info.path} from {info.arch_source} cannot be built ({e}): fix it"
                            ) from None
    specs = info.family.tensor_specs(info.path, config)
    if specs is not None:
        check_specs(meta, specs, info)
    del meta
    return build_model(config, device, dtype, init_weights=init_weights)


def load_weights(model: nn.Module, info: CheckpointInfo) -> nn.Module:
    """Fill a plain (unsharded) model with the checkpoint's model tensors: the family reads them in checkpoint
    layout, transformers' own conversion (`load_converted`, what from_pretrained applies) makes them the model's
    parameters."""
    state = info.family.read_state(info.path, model.config)
    raise_on(load_converted(model, state), info, list(state))
    del state
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def load_model(info: CheckpointInfo, model_cfg=None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, shared_base: bool = False) -> nn.Module:
    """The checkpoint as a ready, eval-mode transformers causal LM on `device` in `dtype`. No random init:
    `load_weights` writes every tensor (it refuses a checkpoint that lacks one; a tied head is tied).

    An adapter is merged into its base; `shared_base=True` takes the base from the process's `base_cache`
    (loaded once, previous adapter undone): the caller must only read the model, and is done with it before
    loading the next checkpoint."""
    if info.base is not None:
        return _load_adapted(info, model_cfg, device, dtype, shared_base)
    if shared_base:  # a whole model in a scan of adapters: one model in memory at a time
        from ckpteval.checkpoint import base_cache

        base_cache.release()
    model = validated_model(info, model_cfg, device="cpu", dtype=dtype, init_weights=False)
    load_weights(model, info)
    return model.to(device).eval()


def _load_adapted(info: CheckpointInfo, model_cfg, device, dtype: torch.dtype, shared: bool) -> nn.Module:
    from ckpteval.checkpoint import base_cache
    from ckpteval.checkpoint.detect import checkpoint_identity

    config = build_config(info, model_cfg)  # before any allocation: the adapter must fit the base

    def base() -> nn.Module:
        model = load_model(info.base, model_cfg, device, dtype)
        if model.config.vocab_size != config.vocab_size:  # added tokens: resize first, as users do
            dev = torch.device(device)  # the new rows are the adapter's: keep the caller's random state
            with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
                model.resize_token_embeddings(config.vocab_size, mean_resizing=False)
        return model

    if not shared:
        model = base()
        info.family.apply(model, info.path)
        return model.eval()
    key = (checkpoint_identity(info.base.path), str(dtype), str(torch.device(device)), config.to_json_string())
    model, previous = base_cache.take(key, base, name=str(info.base.path))
    try:
        undo = info.family.apply(model, info.path, previous=previous)
    except BaseException:
        base_cache.release()  # the family restored what it could; a fresh base is the only certain one
        raise
    base_cache.hold(model, undo)
    return model.eval()


def load_tokenizer(info: CheckpointInfo, required: bool = False):
    """The checkpoint's tokenizer (or the configured override), None when there is none and none is required."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = info.tokenizer_path
    if path is None:
        if required:
            raise CkptEvalError(f"no tokenizer found in or beside {info.path}: pass tokenizer=PATH (a dir with "
                                "tokenizer.json, or the file itself)")
        return None
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if path.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CkptEvalError(f"cannot load the tokenizer at {path} ({e}): pass tokenizer=PATH") from None

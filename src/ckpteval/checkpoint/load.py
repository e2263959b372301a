"""Build the architecture a checkpoint holds and load its weights (model only: never optimizer state).

One path for every format: the architecture comes from config.json (in or beside the checkpoint), from the GGUF
metadata, or from the `model` group; the weights are read into a freshly built model whose tensor names and
shapes are checked first, so a mismatch is one clear error instead of a silent partial load.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from ckpteval.checkpoint.detect import CheckpointInfo, hf_weight_files, read_dcp_metadata
from ckpteval.checkpoint.safe_pickle import safe_filesystem_reader, torch_load
from ckpteval.errors import CkptEvalError

log = logging.getLogger(__name__)


def build_config(info: CheckpointInfo, model_cfg=None):
    """The transformers config of the checkpoint: config.json, GGUF metadata, else the `model` group."""
    from transformers import AutoConfig

    if info.format == "gguf":
        return AutoConfig.from_pretrained(str(info.path.parent), gguf_file=info.path.name)
    if info.config_dir is not None:
        return AutoConfig.from_pretrained(str(info.config_dir))
    if info.format == "hf":
        raise CkptEvalError(f"checkpoint {info.path} has no config.json: an HF model dir needs one")
    if model_cfg is None:
        raise CkptEvalError(f"DCP checkpoint {info.path} has no config.json in or beside it: put one there or "
                            "describe the architecture with model=NAME / model.* overrides")
    log.warning("no config.json in or beside %s: using the `model` group for the architecture", info.path)
    return config_from_model_cfg(model_cfg)


def config_from_model_cfg(model_cfg):
    """A transformers config from the `model` group (HF field names; `extra` holds any other field)."""
    from transformers import AutoConfig

    fields = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    extra = fields.pop("extra", None) or {}
    return AutoConfig.for_model(fields.pop("model_type"), **fields, **extra)


def build_model(config, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM for `config` on `device` in `dtype` (randomly initialised; weights are loaded next)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _check_and_load(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `state` into `model` after checking names and shapes; tied heads may be absent from `state`."""
    expected = model.state_dict()
    tied = {k for k in expected if k.endswith("lm_head.weight")} if getattr(model.config, "tie_word_embeddings",
                                                                             False) else set()
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
             if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise CkptEvalError(f"checkpoint {source} does not match its architecture: tensor shape mismatch "
                            f"(checkpoint vs config) for {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}"
                            f": the config.json (or model group) describes a different model")
    if missing or unexpected:
        parts = [f"{len(names)} {what} tensor(s) (e.g. {names[0]})"
                 for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise CkptEvalError(f"checkpoint {source} does not match its architecture: {', '.join(parts)}: the config.json "
                            "(or model group) describes a different model")
    with torch.no_grad():
        for name, param in expected.items():
            if name in state:
                param.copy_(state[name].to(param.dtype))
    if tied:
        model.tie_weights()


def _hf_state(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in hf_weight_files(info.path):
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
        else:
            state.update(torch_load(f))
    return state


def match_dcp_keys(info: CheckpointInfo, model: nn.Module, state: dict) -> dict[str, str]:
    """{model tensor name: DCP key} for every tensor of `state` (plain or DTensor), checked against the
    checkpoint's metadata: a missing tensor or another shape is one clear error. A tied head that was saved only
    as the embedding is left out (tying fills it)."""
    metadata = read_dcp_metadata(info.path).state_dict_metadata
    prefix = info.dcp_prefix
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    keys: dict[str, str] = {}
    for name, tensor in state.items():
        key = prefix + name
        meta = metadata.get(key)
        if meta is None:
            if tied and name.endswith("lm_head.weight"):
                continue
            available = [k for k in metadata if k.startswith(prefix) and "optim" not in k][:3]
            raise CkptEvalError(f"checkpoint {info.path} does not match its architecture: tensor {key} is missing "
                                f"(it holds e.g. {available}): the config.json (or model group) describes a "
                                "different model")
        shape = tuple(getattr(meta, "size", ()))
        if shape != tuple(tensor.shape):
            raise CkptEvalError(f"checkpoint {info.path} does not match its architecture: tensor shape mismatch "
                                f"for {name}: checkpoint {shape} vs config {tuple(tensor.shape)}: the config.json "
                                "(or model group) describes a different model")
        keys[name] = key
    return keys


def _dcp_state(info: CheckpointInfo, model: nn.Module) -> dict[str, torch.Tensor]:
    """Read only the model's tensors from a DCP checkpoint (optimizer, RNG, ... are never touched)."""
    import torch.distributed.checkpoint as dcp

    metadata = read_dcp_metadata(info.path).state_dict_metadata
    keys = match_dcp_keys(info, model, model.state_dict())
    wanted = {key: torch.empty(tuple(metadata[key].size), dtype=metadata[key].properties.dtype)
              for key in keys.values()}
    dcp.load(wanted, storage_reader=safe_filesystem_reader(info.path), no_dist=True)
    return {name: wanted[key] for name, key in keys.items()}


def load_weights(model: nn.Module, info: CheckpointInfo) -> nn.Module:
    """Fill a plain (unsharded) model with the checkpoint's weights."""
    if info.format == "hf":
        state = _hf_state(info)
    elif info.format == "dcp":
        state = _dcp_state(info, model)
    else:
        raise CkptEvalError(f"load_weights does not read {info.format} checkpoints")
    _check_and_load(model, state, info.path)
    return model


def load_model(info: CheckpointInfo, model_cfg=None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """The checkpoint as a ready, eval-mode transformers causal LM on `device` in `dtype`."""
    if info.format == "gguf":
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(info.path.parent), gguf_file=info.path.name, dtype=dtype)
        except (ValueError, RuntimeError, KeyError) as e:
            raise CkptEvalError(f"cannot load GGUF checkpoint {info.path}: {e}") from None
        return model.to(device).eval()
    model = build_model(build_config(info, model_cfg), device="cpu", dtype=dtype)
    load_weights(model, info)
    return model.to(device).eval()


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

"""Helpers shared by the family modules: small JSON files, config.json as an architecture source, the `model`
group as the last one, and prefix stripping for state dicts saved under a wrapper attribute."""

from __future__ import annotations

import json
from pathlib import Path

from ckpteval.checkpoint.formats.base import Architecture
from ckpteval.errors import CkptEvalError

# Top-level names of a transformers *ForCausalLM state dict (Llama-likes: model/lm_head; GPT-2: transformer).
HF_TOPS = {"model", "lm_head", "transformer"}


def one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line (errors are printed as one `error:` line)."""
    return " ".join(str(exc).split())[:300]


def read_json(path: Path) -> dict:
    """The JSON object in `path`, {} when it is absent or not a JSON object (for optional metadata files)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def int_or_none(value) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def config_dir(*dirs: Path) -> Path | None:
    """The first of `dirs` holding a config.json."""
    return next((d for d in dirs if (d / "config.json").is_file()), None)


def check_config_dict(data, source: str) -> None:
    """A transformers config dict must name a model_type transformers knows (raises naming the fix)."""
    from transformers import CONFIG_MAPPING

    if not isinstance(data, dict):
        raise CkptEvalError(f"{source} is not a JSON object: re-save it with config.save_pretrained(DIR)")
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        shown = "no model_type" if model_type is None else f"model_type {model_type!r}, which this transformers " \
                                                           "does not know"
        raise CkptEvalError(f"{source} has {shown}: set model_type to a transformers architecture (llama, gpt2, "
                            "mistral, qwen2, ...), or upgrade transformers")


def validate_config_json(directory: Path) -> dict:
    """config.json of `directory` parsed and checked (valid JSON, a known model_type); raises CkptEvalError."""
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise CkptEvalError(f"{path} is not valid JSON ({e}): fix or re-save it with config.save_pretrained(DIR)")\
            from None
    except OSError as e:
        raise CkptEvalError(f"{path} is unreadable ({e})") from None
    check_config_dict(data, str(path))
    return data


def config_json_arch(directory: Path) -> Architecture:
    """The architecture in `directory`/config.json (validated first: one clear error, never a traceback)."""
    from transformers import AutoConfig

    data = validate_config_json(directory)
    try:
        config = AutoConfig.for_model(**data)
    except Exception as e:  # noqa: BLE001 - transformers' field validation raises its own error types
        raise CkptEvalError(f"{directory / 'config.json'} is not a valid {data['model_type']} config "
                            f"({one_line(e)}): fix or re-save it") from None
    return Architecture(config, f"config.json in {directory}")


def config_from_dict(data: dict, source: str) -> Architecture:
    from transformers import AutoConfig

    check_config_dict(data, source)
    fields = dict(data)
    try:
        return Architecture(AutoConfig.for_model(fields.pop("model_type"), **fields), source)
    except Exception as e:  # noqa: BLE001 - transformers' field validation raises its own error types
        raise CkptEvalError(f"{source} is not a valid transformers config ({one_line(e)})") from None


def model_group_arch(model_cfg, path: Path, family: str, where: str) -> Architecture:
    """The `model` group as the architecture: the last source, checked against the tensors before any load."""
    if model_cfg is None:
        raise CkptEvalError(f"{family} checkpoint {path} has no architecture source ({where}): put a config.json "
                            "beside it, or describe it with model=NAME / model.* overrides")
    from ckpteval.checkpoint.load import config_from_model_cfg

    return Architecture(config_from_model_cfg(model_cfg), f"the `model` group ({where})")


def hf_prefix(keys) -> str:
    """The wrapper prefix in front of transformers names ("model." for a LightningModule whose `self.model` is
    the *ForCausalLM, "_orig_mod." from torch.compile), "" when the keys are transformers names already.

    A whole *ForCausalLM under one attribute gives keys like `model.model.layers...` + `model.lm_head.weight`:
    the tell is that stripping the first component leaves transformers' own top-level names."""
    keys = list(keys)
    tops = {k.split(".", 1)[0] for k in keys}
    if len(tops) != 1 or not keys:
        return ""
    (top,) = tops
    inner = {k.split(".", 2)[1] for k in keys if k.count(".") >= 1}
    if top in ("lm_head", "transformer"):
        return ""
    # `model.layers...` / `model.embed_tokens...` alone is a transformers model with a tied (unsaved) head
    return top + "." if inner & HF_TOPS else ""

"""Helpers shared by the family modules: small JSON files, config.json as an architecture source, the `model`
group as the last one, the one names-and-shapes comparison, the RoPE row permutation, and prefix stripping for
state dicts saved under a wrapper attribute, and the one conversion of checkpoint layout into model parameters
(transformers' own). Imports nothing of `checkpoint` but `formats.base` and `formats._moe` (no cycles)."""

from __future__ import annotations

import json
from dataclasses import dataclass
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


def position_limit(config) -> int | None:
    """The positions a transformers config allows (`max_position_embeddings`, GPT-2's `n_positions`), None when it
    sets no limit: absent, or <= 0 (OLMo-core's own HF export writes -1 for "no limit": RoPE has none)."""
    value = int_or_none(getattr(config, "max_position_embeddings", None))
    return value if value is not None and value > 0 else None


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


def config_from_model_cfg(model_cfg):
    """A transformers config from the `model` group (HF field names; `extra` holds any other field)."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    fields = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    extra = fields.pop("extra", None) or {}
    try:
        return AutoConfig.for_model(fields.pop("model_type"), **fields, **extra)
    except Exception as e:  # noqa: BLE001 - transformers' field validation raises its own error types
        raise CkptEvalError(f"the `model` group is not a valid transformers config ({one_line(e)}): fix the model.* "
                            "overrides") from None


def model_group_arch(model_cfg, path: Path, family: str, where: str) -> Architecture:
    """The `model` group as the architecture: the last source, checked against the tensors before any load."""
    if model_cfg is None:
        raise CkptEvalError(f"{family} checkpoint {path} has no architecture source ({where}): put a config.json "
                            "beside it, pass ckpt_config=PATH, or describe it with model=NAME / model.* overrides")
    return Architecture(config_from_model_cfg(model_cfg), f"the `model` group ({where})")


CKPT_CONFIG_SOURCE = "ckpt_config="  # how an Architecture's source starts when the user named the config


def ckpt_config_file(value) -> Path:
    """The config.json that `ckpt_config=VALUE` names (the file, or a dir holding one), validated (a valid JSON
    object naming a transformers model_type): one clear error before anything is loaded."""
    given = Path(str(value)).expanduser()
    path = given / "config.json" if given.is_dir() else given
    if not path.is_file():
        raise CkptEvalError(f"ckpt_config={value} is not a config.json nor a dir holding one: point it at the run's "
                            "config.json (model.config.save_pretrained(DIR) writes one)")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise CkptEvalError(f"ckpt_config={value}: {path} is not valid JSON ({e}): fix or re-save it with "
                            "config.save_pretrained(DIR)") from None
    except OSError as e:
        raise CkptEvalError(f"ckpt_config={value}: {path} is unreadable ({e})") from None
    check_config_dict(data, f"ckpt_config={value} ({path})")
    return path.resolve()


def ckpt_config_arch(path: Path) -> Architecture:
    """The architecture `ckpt_config=` names: used instead of every source the checkpoint's family knows (the
    loader still checks it against the checkpoint's tensors before allocating)."""
    return config_from_dict(json.loads(Path(path).read_text()), f"{CKPT_CONFIG_SOURCE}{path}")


def run_dirs(path: Path, levels: int) -> list[Path]:
    """The checkpoint dir and up to `levels` dirs above it: where a trainer's run keeps what it did not save in
    each checkpoint (the output dir's config.json, tokenizer)."""
    d = path if path.is_dir() else path.parent
    return [d, *list(d.parents)[:levels]]


def metadata_step_tokens(ckpt_dir: Path) -> tuple[int | None, int | None]:
    """(step, tokens_seen) from our trainer's `ckpteval.json`, else HF Trainer's `trainer_state.json`."""
    ours = read_json(ckpt_dir / "ckpteval.json")
    if ours:
        return int_or_none(ours.get("step")), int_or_none(ours.get("tokens_seen"))
    hf = read_json(ckpt_dir / "trainer_state.json")
    step, tokens = int_or_none(hf.get("global_step")), int_or_none(hf.get("num_input_tokens_seen"))
    # HF Trainer writes num_input_tokens_seen=0 when it was not counting: unknown, not zero.
    return step, (tokens if tokens else None)


# ---------------------------------------------------------------------------------------------- names and shapes


def compare_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                    tied: bool = False) -> tuple[list[str], list[str], list[str]]:
    """The one names-and-shapes rule: (names whose shapes differ, missing names, unexpected names) of a
    checkpoint's tensors `found` against a model's `expected`; a tied head may be absent."""
    wrong = [k for k, v in expected.items() if k in found and tuple(found[k]) != tuple(v)]
    missing = [k for k in expected if k not in found and not (tied and k.endswith("lm_head.weight"))]
    unexpected = [k for k in found if k not in expected]
    return wrong, missing, unexpected


def meta_model(config):
    """The transformers causal LM `config` describes, built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ckpteval.checkpoint.formats._moe import apply_routing

    with torch.device("meta"):
        return apply_routing(AutoModelForCausalLM.from_config(config))


def meta_state_shapes(config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the transformers causal LM `config` describes, built on the meta device (no memory)."""
    return {k: tuple(v.shape) for k, v in meta_model(config).state_dict().items()}


# ------------------------------------------------------------------------------------ transformers' conversion


@dataclass
class LoadVerdict:
    """What loading a checkpoint-layout state dict into a model found: names whose shapes (after conversion) differ
    as {name: (checkpoint, model)} (a conversion that could not run gives its one-line reason as the checkpoint
    side), model tensors nothing filled, checkpoint tensors with no place in the model."""

    wrong: dict[str, tuple]
    missing: list[str]
    unexpected: list[str]

    @property
    def failed(self) -> bool:
        return bool(self.wrong or self.missing or self.unexpected)


def load_converted(model, state: dict, tied: bool | None = None) -> LoadVerdict:
    """Put `state` (checkpoint names and layouts, as `save_pretrained` writes them) into `model` through the weight
    conversion transformers' own `from_pretrained` applies: its conversion mapping for the model's class and
    `convert_and_load_state_dict_in_model`, the function `from_pretrained` calls (transformers 5: per-expert MoE
    tensors `experts.{j}.w1` / `gate_proj` fused into `experts.gate_up_proj [E, 2I, H]`, legacy renames, a missing
    or extra base-model prefix). Every family returns checkpoint layout and this is the one place that turns it
    into the model's parameters. Meta tensors into a meta model check names and shapes without allocating.
    transformers 4 has no conversion on load (its checkpoint names are its parameter names): a plain copy.
    A tied head may be absent. Nothing is set for a wrong name; the caller raises on a non-empty verdict."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) if tied is None else tied
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:  # transformers 4
        return _load_plain(model, state, tied)
    device = str(next(iter(state.values())).device) if state else "cpu"
    # A family's layout change may leave a view (nanoGPT's transposed Linear weights): the model's parameters are
    # dense like from_pretrained's (FSDP and TP shard only contiguous ones); contiguous tensors are not copied.
    state = {k: v if v.is_contiguous() else v.contiguous() for k, v in state.items()}
    load_config = LoadStateDictConfig(device_map={"": device}, weight_mapping=get_model_conversion_mapping(model))
    with _transformers_quiet():
        info, _ = convert_and_load_state_dict_in_model(model, state, load_config)
    wrong: dict[str, tuple] = {name: (tuple(found), tuple(want)) for name, found, want in info.mismatched_keys}
    for name, text in info.conversion_errors.items():
        wrong[name] = (one_line(text.strip().splitlines()[-1]), tuple(model.state_dict()[name].shape)
                       if name in model.state_dict() else ())
    missing = sorted(k for k in info.missing_keys if k not in wrong and not (tied and k.endswith("lm_head.weight")))
    return LoadVerdict(dict(sorted(wrong.items())), missing, sorted(info.unexpected_keys))


def _load_plain(model, state: dict, tied: bool) -> LoadVerdict:
    import torch

    expected = model.state_dict()
    wrong, missing, unexpected = compare_tensors({k: tuple(v.shape) for k, v in expected.items()},
                                                 {k: tuple(v.shape) for k, v in state.items()}, tied)
    verdict = LoadVerdict({k: (tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong}, missing, unexpected)
    if not verdict.failed and next(iter(expected.values())).device.type != "meta":
        with torch.no_grad():
            for name, param in expected.items():
                if name in state:
                    param.copy_(state[name].to(param.dtype))
    return verdict


class _transformers_quiet:
    """No "Loading weights" progress bar per checkpoint (a scan loads hundreds)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self._was:
            hf_logging.enable_progress_bar()


def converted_shapes_verdict(config, shapes: dict[str, tuple[int, ...]]) -> LoadVerdict:
    """The names-and-shapes verdict of checkpoint-layout `shapes` against the model `config` describes, after
    transformers' conversion, on the meta device."""
    import torch

    model = meta_model(config)
    return load_converted(model, {k: torch.empty(tuple(v), device="meta") for k, v in shapes.items()})


def check_shapes(config, shapes: dict[str, tuple[int, ...]], source: str, path: Path) -> None:
    """The tensors must be the model `config` describes: a contradiction names both (no silent fallback)."""
    verdict = converted_shapes_verdict(config, shapes)
    if verdict.failed:
        detail = [f"{k} is {found} in the checkpoint but {want} there" for k, (found, want) in
                  list(verdict.wrong.items())[:2]] or [
            f"{len(verdict.missing)} tensor(s) it needs are absent (e.g. {verdict.missing[0]})" if verdict.missing
            else f"{len(verdict.unexpected)} tensor(s) have no place in it (e.g. {verdict.unexpected[0]})"]
        fix = ("describe the model with model.* overrides, or put its config.json beside the checkpoint (or pass "
               "ckpt_config=PATH)" if source.startswith("the `model` group") else
               "point ckpt_config= at the run's own config.json" if source.startswith(CKPT_CONFIG_SOURCE) else
               "fix or remove that config, or put the right config.json beside the checkpoint (or pass "
               "ckpt_config=PATH)")
        raise CkptEvalError(f"checkpoint {path} contradicts its architecture source, {source}: "
                            f"{'; '.join(detail)}: {fix}")


def architecture_from_sources(path: Path, model_cfg, shapes, job_config_fn, family: str, adjust=None) -> Architecture:
    """config.json in/beside the checkpoint, else `job_config_fn()` (the trainer's own config, or None), else the
    `model` group, checked against the tensor shapes (`shapes`: {name: shape}, or a function of the config giving
    them); then `adjust(config)` (optional) completes it from the checkpoint (e.g. a routing flag)."""
    d = path if path.is_dir() else path.parent
    cdir = config_dir(d, d.parent)
    arch = config_json_arch(cdir) if cdir is not None else job_config_fn()
    if arch is None:
        arch = model_group_arch(model_cfg, path, family, "no config.json in or beside it, no trainer config")
    check_shapes(arch.config, shapes(arch.config) if callable(shapes) else shapes, arch.source, path)
    if adjust is not None:
        adjust(arch.config)
    return arch


def rope_pairs_to_halves(w, n_heads: int):
    """q/k projection rows from the interleaved RoPE layout (rows 2j, 2j+1 of a head form one rotated pair, as
    in torchtitan's complex RoPE, Meta's Llama and Megatron's `rotary_interleaved`) to transformers' half-split
    layout (rows j, j + head_dim/2 form the pair, as rotate_half expects): per head, all even rows first, then
    all odd rows."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


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


def read_tensor_bin(path: Path, mmap: bool = False, resave: str = "re-save it with model.save_pretrained(DIR)"
                    ) -> dict:
    """A `torch.save`d state dict of tensors (pytorch_model.bin, adapter_model.bin) through the pickle allow-list;
    `mmap` pages tensors in only when read (the zip format torch.save writes since 1.6; older files load whole)."""
    import zipfile

    import torch

    from ckpteval.checkpoint.safe_pickle import torch_load

    state = torch_load(path, mmap=mmap and zipfile.is_zipfile(path))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CkptEvalError(f"checkpoint file {path} is not a state dict of tensors (it holds a "
                            f"{type(state).__name__}): {resave}")
    return state


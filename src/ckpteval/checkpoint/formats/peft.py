"""PEFT LoRA adapters (incl. DoRA and rsLoRA), as `PeftModel.save_pretrained`, the HF Trainer and TRL write them.

    ckpt=out/checkpoint-300                              # adapter_config.json + adapter_model.safetensors
    ckpt=out/checkpoint-300 ckpt_base=/models/llama-1b   # when base_model_name_or_path is not available offline

The base: `ckpt_base=PATH` when given, else `base_model_name_or_path` from adapter_config.json when it is a local
path or a hub id already in the local Hugging Face cache (looked up offline: never downloaded). It may be a
checkpoint of any family ckpteval reads (`detect.inspect_checkpoint` inspects it like any other).

Reading: the adapter's tensors come from adapter_model.safetensors, or adapter_model.bin through the pickle
allow-list: never through PEFT's or torch's own loader. Everything else is PEFT's own code: `get_peft_model` wraps
the base's modules for the adapter's `LoraConfig`, `set_peft_model_state_dict` loads our tensors into them and
`merge_and_unload` merges them (DoRA magnitudes, rsLoRA scaling, `modules_to_save` copies). An adapter trained
after adding tokens holds a resized embedding (`modules_to_save`, or the embedding layers PEFT saved beside it): its
base is resized to that vocabulary first, as users do (`resize_token_embeddings`). Adapter types other than LoRA
(IA3, prefix tuning, LoHa, ...) are refused by name.

Checks, before anything is allocated: the adapter's tensor names and shapes against those PEFT creates for the
base's architecture on the `meta` device (an adapter of another model is one error naming both). `apply` returns
an exact undo (the base keeps its own tensors: whatever PEFT merges into or writes over is a copy made first, and
the modules it replaced are put back), so a scan swaps adapters on one loaded base (`checkpoint.base_cache`); the
next adapter of the same LoraConfig is loaded into the LoRA layers PEFT built for the previous one and merged by
PEFT's `merge_adapter` (`_Injected`: no re-wrapping per checkpoint). Step and tokens: HF Trainer's `trainer_state.json`.
"""

from __future__ import annotations

import copy
import json
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from ckpteval.checkpoint.formats import _common
from ckpteval.checkpoint.formats.base import AdapterFormat, Architecture
from ckpteval.errors import CkptEvalError

_RESAVE = "re-save the adapter with model.save_pretrained(DIR)"

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Whole-model weight files: a dir holding one of them is a model dir (the `hf` family), not an adapter.
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
SUPPORTED = ("LORA",)
PROMPT_LEARNING = ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT")
CAUSAL_TASKS = (None, "CAUSAL_LM")
PREFIX = "base_model.model."  # PEFT's prefix of every saved key
ADAPTER = "default"  # the adapter's name inside PEFT (saved keys carry none)
EMBEDDING_SUFFIXES = ("weight", "base_layer.weight", "original_module.weight", "modules_to_save.weight")


# ---------------------------------------------------------------------------------------------- files


def adapter_config(path: Path) -> dict:
    """adapter_config.json, checked to be a PEFT config (a JSON object naming its peft_type)."""
    file = Path(path) / CONFIG
    try:
        data = json.loads(file.read_text())
    except ValueError as e:
        raise CkptEvalError(f"{file} is not valid JSON ({e}): re-save the adapter with model.save_pretrained(DIR)"
                            ) from None
    except OSError as e:
        raise CkptEvalError(f"{file} is unreadable ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("peft_type"), str):
        raise CkptEvalError(f"{file} is not a PEFT adapter config (it names no peft_type): re-save the adapter with "
                            "model.save_pretrained(DIR)")
    return data


def check_supported(path: Path, data: dict) -> None:
    """LoRA for causal LMs only; anything else is refused naming what it is."""
    kind = data["peft_type"].upper()
    if kind not in SUPPORTED:
        how = ("it adds virtual tokens at run time and has no merged-weights form: evaluate it with lm_eval --model "
               "hf --model_args pretrained=BASE,peft=DIR" if kind in PROMPT_LEARNING else
               "merge it with PEFT (PeftModel.from_pretrained(base, DIR).merge_and_unload().save_pretrained(OUT)) "
               "and evaluate OUT")
        raise CkptEvalError(f"checkpoint {path} is a PEFT {kind} adapter (peft_type in {CONFIG}): ckpteval applies "
                            f"LoRA adapters (incl. DoRA, rsLoRA) only, not {kind}; {how}")
    task = data.get("task_type")
    if task not in CAUSAL_TASKS:
        raise CkptEvalError(f"checkpoint {path} is a LoRA adapter for task_type {task} ({CONFIG}): ckpteval "
                            "evaluates causal language models (task_type CAUSAL_LM)")


def weight_file(path: Path) -> Path:
    found = next((Path(path) / n for n in WEIGHTS if (Path(path) / n).is_file()), None)
    if found is None:
        raise CkptEvalError(f"checkpoint {path} is incomplete: it has {CONFIG} but no {' or '.join(WEIGHTS)} "
                            "(still being written, or the save crashed)")
    return found


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{saved key: shape} from the safetensors header, or the allow-listed pickle (memory-mapped)."""
    f = weight_file(path)
    st = f.stat()
    return dict(_shapes(str(f), st.st_mtime_ns, st.st_size))


@lru_cache(maxsize=16)
def _shapes(file: str, mtime_ns: int, size: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    if file.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:  # safe_open refuses a header that points past the end of the file (a partial copy)
            with safe_open(file, "pt") as sf:
                return tuple((k, tuple(sf.get_slice(k).get_shape())) for k in sf.keys())  # noqa: SIM118 - not a dict
        except (SafetensorError, OSError) as e:
            raise CkptEvalError(f"checkpoint file {file} is unreadable or truncated ({_common.one_line(e)}): it is "
                                "still being written, or the copy was cut short") from None
    state = _common.read_tensor_bin(Path(file), mmap=True, resave=_RESAVE)
    return tuple((k, tuple(v.shape)) for k, v in state.items())


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, on CPU, read by us (safetensors, or the pickle allow-list)."""
    f = weight_file(path)
    if f.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CkptEvalError(f"checkpoint file {f} is unreadable ({_common.one_line(e)}): re-copy or re-save it"
                                ) from None
    return _common.read_tensor_bin(f, resave=_RESAVE)



def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise CkptEvalError("reading PEFT adapters needs the peft package: pip install 'ckpteval[peft]'") from None


def lora_config(path: Path):
    """PEFT's own `LoraConfig` of the adapter (PEFT reads the JSON), for inference."""
    check_supported(path, adapter_config(path))
    require_peft()
    from peft import LoraConfig

    try:
        with _quiet():
            config = LoraConfig.from_pretrained(str(path))
    except (TypeError, ValueError) as e:
        raise CkptEvalError(f"{Path(path) / CONFIG} is not a LoRA config this PEFT reads ({_common.one_line(e)}): "
                            "upgrade peft, or re-save the adapter") from None
    config.inference_mode = True
    return config


@contextmanager
def _quiet():
    """PEFT warns about things we check ourselves (and about its own defaults): keep the log to our lines."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------- the base


def hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot of a hub repo in the Hugging Face cache (offline lookup, never a download), or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a repo id, not cached, no huggingface_hub: not available offline
        return None


# ---------------------------------------------------------------------------------------------- shapes


_META: dict[tuple, object] = {}  # meta-model answers per (adapter config, architecture): a scan asks them repeatedly


def _memo(key: tuple, compute):
    if key not in _META:
        if len(_META) > 16:
            _META.clear()
        _META[key] = compute()
    return _META[key]


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), _quiet():
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def _embedding_names(config) -> tuple[str | None, str | None]:
    """Module names of the input and output embeddings of the architecture (built on `meta`)."""
    def compute():
        model = _meta_model(config)
        names = {id(m): n for n, m in model.named_modules()}
        head = model.get_output_embeddings()
        return names.get(id(model.get_input_embeddings())), names.get(id(head)) if head is not None else None

    return _memo(("embeddings", _config_json(config)), compute)


def _expected(lora_json: str, config, path: Path) -> tuple[dict, dict]:
    """({adapter key: shape} PEFT saves for this LoRA config on this architecture, {key: shape} of everything
    else the PEFT-wrapped model holds, i.e. base tensors an adapter file may carry), from a `meta` model."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    def compute():
        model = _meta_model(config)
        with torch.device("meta"), _quiet():
            try:
                wrapped = get_peft_model(model, LoraConfig(**json.loads(lora_json)), adapter_name=ADAPTER)
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                return e
            saved = get_peft_model_state_dict(wrapped, adapter_name=ADAPTER, save_embedding_layers=False)
            adapter = {k: tuple(v.shape) for k, v in saved.items()}
            whole = {k.replace(f".{ADAPTER}", ""): tuple(v.shape) for k, v in wrapped.state_dict().items()}
        return adapter, whole

    found = _memo(("expected", lora_json, _config_json(config)), compute)
    if isinstance(found, Exception):
        raise CkptEvalError(f"PEFT adapter {path} does not fit its base: {_common.one_line(found)}: pass the base it "
                            "was trained on (ckpt_base=PATH)")
    return found


def _config_json(config) -> str:
    return config.to_json_string(use_diff=False)


def _lora_json(path: Path) -> str:
    """The adapter config as LoraConfig kwargs (what the meta check depends on; not where the base lives)."""
    return _lora_kwargs(lora_config(path))


def _lora_kwargs(config) -> str:
    data = config.to_dict()
    for key in ("base_model_name_or_path", "revision", "peft_version", "auto_mapping"):
        data.pop(key, None)
    return json.dumps(data, sort_keys=True, default=lambda o: sorted(o) if isinstance(o, set) else str(o))


def adapter_vocab(path: Path, shapes: dict, config) -> int:
    """The vocabulary size the adapter's tensors say the model has (the base's unless it saved a resized
    embedding or head); raises when they disagree or when a resize leaves rows that no tensor fills."""
    embed, head = _embedding_names(config)
    saved = {m: [k for k in (f"{PREFIX}{m}.{suffix}" for suffix in EMBEDDING_SUFFIXES) if k in shapes]
             for m in (embed, head) if m}  # full embedding / head tensors the adapter carries
    sizes = {k: int(shapes[k][0]) for keys in saved.values() for k in keys}
    if len(set(sizes.values())) > 1:
        raise CkptEvalError(f"PEFT adapter {path} holds embeddings of different vocabularies "
                            f"({', '.join(f'{k} {v}' for k, v in sizes.items())}): re-save it")
    vocab = next(iter(sizes.values()), int(config.vocab_size))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    lacking = [m for m, keys in saved.items() if not keys and not (tied and m == head)]
    if vocab != config.vocab_size and lacking:
        raise CkptEvalError(f"PEFT adapter {path} resizes the vocabulary to {vocab} (base: {config.vocab_size}) but "
                            f"holds no full {lacking[0]} for the new rows: train it with modules_to_save="
                            f"[{', '.join(repr(m.rsplit('.', 1)[-1]) for m in saved)}]")
    return vocab


def _check_tensors(path: Path, shapes: dict, adapter: dict, whole: dict, base_source: str) -> None:
    wrong = [k for k in shapes if k in adapter and shapes[k] != adapter[k]]
    wrong += [k for k in shapes if k not in adapter and k in whole and shapes[k] != whole[k]]
    missing = [k for k in adapter if k not in shapes]
    unplaced = [k for k in shapes if k not in adapter and k not in whole]
    if not (wrong or missing or unplaced):
        return
    if wrong:
        detail = "; ".join(f"{k.removeprefix(PREFIX)} is {shapes[k]} in the adapter but "
                           f"{adapter.get(k, whole.get(k))} for the base" for k in wrong[:2])
    elif missing:
        detail = f"it lacks {len(missing)} tensor(s) its config says it has (e.g. {missing[0].removeprefix(PREFIX)})"
    else:
        detail = (f"{len(unplaced)} of its tensor(s) have no place in the base (e.g. "
                  f"{unplaced[0].removeprefix(PREFIX)})")
    raise CkptEvalError(f"PEFT adapter {path} does not fit its base ({base_source}): {detail}: pass the base it was "
                        "trained on (ckpt_base=PATH)")


# ---------------------------------------------------------------------------------------------- undo


class _Tree:
    """Which module sits where: every module's children, to be put back by reference (nothing is rebuilt)."""

    def __init__(self, model: torch.nn.Module):
        self.children = [(m, dict(m._modules)) for m in model.modules()]

    def install(self) -> None:
        for module, children in self.children:
            for name in [n for n in module._modules if n not in children]:
                delattr(module, name)
            for name, child in children.items():
                if module._modules.get(name) is not child:
                    setattr(module, name, child)


class _Restore:
    """Puts a model back exactly as it was before PEFT touched it: the same module objects in the same places,
    the same parameter tensors (by reference, so nothing is recomputed), requires_grad flags, attributes and
    config values (PEFT's unload may untie `tie_word_embeddings`).

    PEFT's merge writes into the wrapped layers' weights and `set_peft_model_state_dict` may write base tensors
    an adapter file carries (a resized embedding) in place: `protect` gives each of those a copy to write into
    first, so the originals stay untouched. `kept`: PEFT's injected layers, for the next adapter of the same
    LoraConfig on this model (see `_Injected`)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.tree = _Tree(model)
        self.params = [(p, p.data, p.requires_grad) for p in model.parameters()]
        self.attrs = set(model.__dict__)
        config = getattr(model, "config", None)
        self.config = dict(vars(config)) if config is not None else None
        self.kept: _Injected | None = None

    def protect(self, wrapped: torch.nn.Module, keys, spares: dict[int, torch.Tensor]) -> None:
        """`spares`: the copies the previous adapter of these layers was merged into, by parameter (its merged
        weights are dead once the undo ran): the pristine weights are copied into them rather than into fresh
        allocations (the same bytes, no page faults or frees of a model-sized buffer per checkpoint)."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        owned: set[int] = set()

        def own(param: torch.nn.Parameter) -> None:
            if id(param) in owned:
                return
            owned.add(id(param))
            spare = spares.get(id(param))
            data = param.data
            if (spare is None or spare.shape != data.shape or spare.dtype != data.dtype or spare.device != data.device
                    or spare.data_ptr() == data.data_ptr()):
                spare = spares[id(param)] = torch.empty_like(data)
            param.data = spare.copy_(data)

        for module in wrapped.modules():
            if isinstance(module, BaseTunerLayer):
                for param in module.get_base_layer().parameters():
                    own(param)
            elif isinstance(module, AuxiliaryTrainingWrapper) and module.original_module is not None:
                for param in module.original_module.parameters():
                    own(param)
        for key in keys:
            try:
                own(wrapped.get_parameter(key))
            except AttributeError:
                continue

    def __call__(self) -> None:
        self.tree.install()
        for param, data, grad in self.params:
            param.data = data
            param.requires_grad_(grad)
        for name in set(self.model.__dict__) - self.attrs:
            del self.model.__dict__[name]
        if self.config is not None:
            config = vars(self.model.config)
            config.clear()
            config.update(self.config)


class _Injected:
    """PEFT's LoRA layers for one LoraConfig on one base model, kept from one adapter to the next.

    A scan's adapters mostly share one LoraConfig: the next one is loaded into the same layers instead of wrapping
    the base again (PEFT builds ~10 modules per layer and walks the model several times: most of a swap's cost).
    Each adapter still goes through PEFT's own code: `set_peft_model_state_dict` loads it and `merge_adapter`
    merges it (the merge `merge_and_unload` does), into copies of the base's pristine weights (`_Restore.protect`);
    the model is then laid out exactly as PEFT's `merge_and_unload` left it for the first adapter (`unloaded`),
    so callers see the same plain modules either way."""

    def __init__(self, lora: str, peft_model, model: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

        self.lora = lora
        self.model = model
        self.peft_model = peft_model
        self.wrapped = _Tree(model)  # as get_peft_model left it
        self.grads = [(p, p.requires_grad) for p in model.parameters()]
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        # Layouts whose unload is more than "merge, then put the base layer back" (trainable tokens) are not kept.
        self.reusable = all(isinstance(m, ModulesToSaveWrapper) for m in model.modules()
                            if isinstance(m, AuxiliaryTrainingWrapper))
        self.unloaded: _Tree | None = None
        self.spares: dict[int, torch.Tensor] = {}  # `_Restore.protect`'s copies, reused by the next adapter

    def fits(self, model: torch.nn.Module, lora: str) -> bool:
        return self.model is model and self.lora == lora and self.reusable and self.unloaded is not None

    def reinstall(self) -> None:
        """PEFT's layers back in place, unmerged (the base under them is pristine again: the undo restored it)."""
        self.wrapped.install()
        for param, grad in self.grads:
            param.requires_grad_(grad)
        for layer in self.layers:
            layer.merged_adapters = []  # BaseTunerLayer's record of what is merged; the weights are pristine

    def merge_and_unload(self) -> None:
        """The first adapter: PEFT's `merge_and_unload` (its layout recorded); later ones: PEFT's `merge_adapter`,
        then that recorded layout."""
        if self.unloaded is None:
            self.peft_model.merge_and_unload()
            self.unloaded = _Tree(self.model)
        else:
            self.peft_model.merge_adapter()
            self.unloaded.install()


# ---------------------------------------------------------------------------------------------- the family


class PeftFormat(AdapterFormat):
    name = "peft"
    description = ("a PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors or .bin), e.g. an HF "
                   "Trainer / TRL checkpoint-N; its base from base_model_name_or_path or ckpt_base=PATH")

    def looks_like(self, path: Path) -> bool:
        return path.is_dir() and (path / CONFIG).is_file() and not any((path / n).is_file() for n in MODEL_WEIGHTS)

    def check_complete(self, path: Path) -> None:
        if not path.is_dir():
            raise CkptEvalError(f"checkpoint {path} is not a directory: {self.description}")
        adapter_config(path)
        tensor_shapes(path)  # the weights present, the safetensors header whole, a pickle allowed and readable

    def step_tokens(self, path: Path) -> tuple[int | None, int | None]:
        return _common.metadata_step_tokens(path)

    def base_location(self, path: Path, override: str | None) -> Path:
        data = adapter_config(path)
        check_supported(path, data)
        if override:
            base = Path(str(override)).expanduser()
            if not base.exists():
                raise CkptEvalError(f"ckpt_base={override} does not exist: pass the base model of adapter {path} "
                                    "(a local checkpoint: HF dir, DCP dir, ...)")
            return base.resolve()
        name = data.get("base_model_name_or_path")
        if not isinstance(name, str) or not name.strip():
            raise CkptEvalError(f"PEFT adapter {path} does not name its base model (no base_model_name_or_path in "
                                f"{CONFIG}): pass ckpt_base=PATH (the base model's local dir)")
        local = Path(name).expanduser()
        if local.exists():
            return local.resolve()
        cached = hub_snapshot(name, data.get("revision"))
        if cached is not None:
            return cached
        raise CkptEvalError(f"the base model of PEFT adapter {path}, {name!r} (base_model_name_or_path in {CONFIG}), "
                            "is not available offline: it is neither a local path nor in the local Hugging Face hub "
                            "cache; pass ckpt_base=PATH (a local copy of the base model)")

    def adapted_architecture(self, path: Path, base: Architecture) -> Architecture:
        shapes = tensor_shapes(path)
        lora_json = _lora_json(path)
        config = copy.deepcopy(base.config)
        vocab = adapter_vocab(path, shapes, config)
        note = ""
        if vocab != config.vocab_size:
            note = f", vocabulary resized {config.vocab_size} -> {vocab}"
            config.vocab_size = vocab
        adapter, whole = _expected(lora_json, config, path)
        _check_tensors(path, shapes, adapter, whole, base.source)
        lora = json.loads(lora_json)
        kind = "DoRA" if lora.get("use_dora") else "rsLoRA" if lora.get("use_rslora") else "LoRA"
        return Architecture(config, f"{base.source}, with the PEFT {kind} adapter in {path} (r={lora.get('r')}"
                                    f"{note})")

    def apply(self, model: torch.nn.Module, path: Path, previous=None):
        from peft import get_peft_model, set_peft_model_state_dict

        config = lora_config(path)
        lora = _lora_kwargs(config)
        state = read_tensors(path)
        kept = getattr(previous, "kept", None)
        if not isinstance(kept, _Injected):
            kept = None
        elif not kept.fits(model, lora):
            kept.spares.clear()  # not reused: free its copies before this adapter makes its own
            kept = None
        restore = _Restore(model)
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        try:
            # PEFT initialises the adapter layers it creates (random lora_A) before our tensors overwrite them:
            # keep the caller's random state as it was.
            with torch.random.fork_rng(devices=devices), _quiet():
                if kept is None:
                    kept = _Injected(lora, get_peft_model(model, config, adapter_name=ADAPTER), model)
                else:
                    kept.reinstall()
                restore.protect(kept.peft_model, state, kept.spares)
                result = set_peft_model_state_dict(kept.peft_model, state, adapter_name=ADAPTER)
                missing = [k for k in result.missing_keys if f".{ADAPTER}" in k]
                if missing:
                    raise CkptEvalError(f"PEFT adapter {path} left {len(missing)} adapter tensor(s) unloaded (e.g. "
                                        f"{missing[0]}): re-save it")
                kept.merge_and_unload()
        except ValueError as e:
            restore()
            raise CkptEvalError(f"PEFT cannot merge the adapter {path} into its base ({_common.one_line(e)})"
                                ) from None
        except BaseException:
            restore()
            raise
        restore.kept = kept
        return restore

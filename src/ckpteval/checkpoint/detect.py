"""What a checkpoint path is, whether it is finished, and which step it holds — without reading tensors.

The family modules in `checkpoint/formats/` answer each question for their own layout; this module asks the
registry which family a path belongs to (or takes `ckpt_format=NAME`) and gathers the answers in one
`CheckpointInfo`. Everything here is cheap (listings, JSON, headers, DCP `.metadata`, memory-mapped pickles),
because sweeps and watchers call `check_complete` / `inspect_checkpoint` on every poll.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ckpteval.checkpoint.formats import (
    REGISTRY,
    CheckpointFormat,
    _common,
    all_formats,
    detect_format,
    get_format,
)
from ckpteval.checkpoint.info import CheckpointInfo
from ckpteval.errors import CkptEvalError
from ckpteval.steps import is_checkpoint_file, step_in_name

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


# ---------------------------------------------------------------------------------------------- step


def parse_step(path) -> int | None:
    """Step from the name (`step_1200`, `step-1200`, `global_step1200`, `iter_0001200`, `checkpoint-1200`,
    `epoch=0-step=1200.ckpt`), else the parent's name (a `model.gguf` inside `step_1200/`), else, for a local
    nanoGPT ckpt.pt (one file overwritten in place), its `iter_num`; None when none says."""
    p = Path(str(path).rstrip("/"))
    for name in (p.stem if is_checkpoint_file(p.name) else p.name, p.parent.name):
        step = step_in_name(name)
        if step is not None:
            return step
    return file_step(p)


def file_step(path) -> int | None:
    """The step a local checkpoint file carries inside (nanoGPT's `iter_num`), None when it carries none."""
    p = Path(str(path))
    nano = get_format("nanogpt")
    try:
        if p.is_absolute() and nano.looks_like(p):
            return nano.step_tokens(nano.resolve(p))[0]
    except (CkptEvalError, OSError):
        return None
    return None


# ---------------------------------------------------------------------------------------------- format


def _expected() -> str:
    return "expected " + "; ".join(f"{fmt.description} (ckpt_format={fmt.name})" for fmt in all_formats())


def _detect(path: Path, forced: str | None = None) -> tuple[CheckpointFormat, Path]:
    """(family, checkpoint path) after the family's completeness checks; raises CkptEvalError naming what is
    wrong, the format detected, and the override that fixes it."""
    if not path.exists():
        raise CkptEvalError(f"checkpoint {path} does not exist: check the path ({_expected()})")
    family = detect_format(path, forced)
    if family is None:
        if path.is_dir():
            names = sorted(p.name for p in path.iterdir())
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "nothing"
        else:
            shown = f"a {path.suffix or 'suffix-less'} file"
        raise CkptEvalError(f"checkpoint {path} is not a recognised checkpoint: found {shown}; {_expected()}. "
                            f"If it is one of these, force it with ckpt_format=NAME ({', '.join(REGISTRY)})")
    ckpt = family.resolve(path)
    try:
        family.check_complete(ckpt)
    except CkptEvalError as e:
        how = f"ckpt_format={forced} was forced" if forced else f"read as ckpt_format={family.name}"
        raise CkptEvalError(f"{e} [{how}; another format? set ckpt_format=NAME: {', '.join(REGISTRY)}]") from None
    return family, ckpt


def forced_format(ckpt_format) -> str | None:
    """The family name `ckpt_format=` forces (None for auto/unset); accepts the config Enum or a string."""
    name = getattr(ckpt_format, "value", ckpt_format)
    return None if name in (None, "", "auto") else str(name)


def check_complete(path, ckpt_format: str | None = None) -> tuple[bool, str]:
    """(complete?, reason) without reading tensors: for watchers deciding whether a checkpoint is ready yet."""
    try:
        _detect(Path(str(path)).expanduser(), forced_format(ckpt_format))
    except CkptEvalError as e:
        return False, str(e)
    return True, ""


# ---------------------------------------------------------------------------------------------- inspect


def _has_tokenizer(d: Path) -> bool:
    return any((d / n).is_file() for n in TOKENIZER_FILES)


def _find_tokenizer(family: CheckpointFormat, ckpt: Path, override: str | None) -> Path | None:
    if override:
        tok = Path(override).expanduser()
        if (tok.is_dir() and _has_tokenizer(tok)) or (tok.is_file() and tok.suffix in (".json", ".gguf")):
            return tok
        raise CkptEvalError(f"tokenizer={override} is not a tokenizer: pass a dir with tokenizer.json (or "
                            "tokenizer.model / vocab.json), or a tokenizer.json file")
    if ckpt.suffix == ".gguf":
        from gguf import GGUFReader

        if "tokenizer.ggml.tokens" in GGUFReader(str(ckpt)).fields:
            return ckpt
    return next((d for d in family.tokenizer_dirs(ckpt) if _has_tokenizer(d)), None)


def inspect_checkpoint(path, tokenizer_override: str | None = None, ckpt_format: str | None = None,
                       *, ckpt_config: str | None = None, ckpt_base: str | None = None) -> CheckpointInfo:
    """Detect the family (or take `ckpt_format`), check the checkpoint is complete, find its step, tokens seen,
    config.json and tokenizer. A config.json found in or beside it, or named by `ckpt_config`, is validated here,
    before anything loads it. An adapter's base (`ckpt_base`, else the one the adapter names) is inspected the same
    way, as `info.base`."""
    override = _common.ckpt_config_file(ckpt_config) if ckpt_config else None
    if "://" in str(path):  # s3://, gs://, ...: a local copy of just what evaluation reads
        from ckpteval.checkpoint.remote import materialize

        path = materialize(str(path))
    family, ckpt = _detect(Path(str(path)).expanduser().resolve(), forced_format(ckpt_format))
    base = _inspect_base(family, ckpt, ckpt_base, ckpt_config)
    if base is not None:
        override = None  # ckpt_config= describes an adapter's base (applied there), never the adapter itself
    step, tokens = family.step_tokens(ckpt)
    path_step = parse_step(ckpt) if family.name != "nanogpt" else None
    config_dir = None if family.name == "gguf" else family.hf_config_dir(ckpt)
    if config_dir is not None:
        _common.validate_config_json(config_dir)
    prefix = family.sharded_dcp_prefix(ckpt)
    tokenizer = _find_tokenizer(family, ckpt, tokenizer_override)
    return CheckpointInfo(
        path=ckpt, format=family.name, step=path_step if path_step is not None else step, tokens_seen=tokens,
        config_dir=config_dir, tokenizer_path=tokenizer or (base.tokenizer_path if base else None), dcp_prefix=prefix,
        family=family, ckpt_config=override, base=base,
    )


def inspect_configured(cfg, ckpt=None) -> CheckpointInfo:
    """`inspect_checkpoint` of `ckpt` (default `cfg.ckpt`) with the job config's checkpoint settings: `tokenizer`,
    `ckpt_format`, `ckpt_config`, `ckpt_base` (what every mode that reads a checkpoint passes)."""
    return inspect_checkpoint(cfg.ckpt if ckpt is None else ckpt, cfg.get("tokenizer"), cfg.get("ckpt_format"),
                              ckpt_config=cfg.get("ckpt_config"), ckpt_base=cfg.get("ckpt_base"))


def _inspect_base(family: CheckpointFormat, ckpt: Path, override: str | None,
                  ckpt_config: str | None = None) -> CheckpointInfo | None:
    """The base of an adapter, inspected with the normal detection (None for a whole-model family); `ckpt_config`
    is the base's architecture when given."""
    from ckpteval.checkpoint.formats.base import AdapterFormat

    if not isinstance(family, AdapterFormat):
        return None
    location = family.base_location(ckpt, override)
    try:
        base = inspect_checkpoint(location, ckpt_config=ckpt_config)
    except CkptEvalError as e:
        raise CkptEvalError(f"the base model of adapter {ckpt} ({location}) cannot be read: {e}") from None
    if base.base is not None:
        raise CkptEvalError(f"the base model of adapter {ckpt}, {location}, is itself an adapter: ckpteval applies "
                            f"one adapter to a whole model; merge {location} into its base first (mode=convert "
                            f"ckpt={location}) and pass ckpt_base=THAT_DIR")
    return base


# ---------------------------------------------------------------------------------------------- identity


def checkpoint_identity(path) -> str:
    """Stable hash of the resolved path and every file's (relative name, size, mtime_ns): changes when any file
    is rewritten, so caches and watchers never reuse results of an older checkpoint at the same path."""
    root = Path(str(path)).expanduser().resolve()
    h = hashlib.sha256(str(root).encode())
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
    for f in files:
        st = f.stat()
        rel = f.name if f == root else f.relative_to(root).as_posix()
        h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]

"""What a checkpoint path is, whether it is finished, and which step it holds — without reading tensors.

Everything here is cheap (directory listings, JSON, safetensors headers, DCP `.metadata`), because sweeps and
watchers call `check_complete` / `inspect_checkpoint` on every poll and must not pay for loading weights.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ckpteval.errors import CkptEvalError

EXPECTED = ("expected an HF model dir (config.json + model.safetensors, or model-*-of-*.safetensors + "
            "model.safetensors.index.json), a DCP dir (.metadata + *.distcp) or a .gguf file")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLE = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
STEP_RE = re.compile(r"(?<![a-z0-9])(?:global_step|step|iter|checkpoint)[_-]?(\d+)(?![0-9])", re.IGNORECASE)
SHARD_RE = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")
# Top-level entries a trainer saves beside "model" in one DCP checkpoint; never model weights.
TRAINER_ENTRIES = {"optim", "optimizer", "optimizers", "scheduler", "lr_scheduler", "lr_schedulers", "dataloader",
                   "train_state", "rng", "extra", "state", "param_groups", "step"}


@dataclass
class CheckpointInfo:
    path: Path  # the checkpoint dir, or the .gguf file
    format: str  # "hf" | "dcp" | "gguf"
    step: int | None
    tokens_seen: int | None
    config_dir: Path | None  # where config.json was found (None = from ModelConfig, or GGUF metadata)
    tokenizer_path: Path | None  # dir, tokenizer.json file, or the .gguf file itself
    dcp_prefix: str = ""  # "model." when the model sits under a "model" entry (our trainer), else ""


# ---------------------------------------------------------------------------------------------- step


def parse_step(path) -> int | None:
    """Step from the name (`step_1200`, `global_step1200`, `iter_0001200`, `checkpoint-1200`), else the parent's
    name (a `model.gguf` inside `step_1200/`); None when neither says."""
    p = Path(str(path).rstrip("/"))
    for name in (p.stem if p.suffix == ".gguf" else p.name, p.parent.name):
        match = STEP_RE.search(name)
        if match:
            return int(match.group(1))
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _metadata_step_tokens(ckpt_dir: Path) -> tuple[int | None, int | None]:
    """(step, tokens_seen) from our trainer's `ckpteval.json`, else HF Trainer's `trainer_state.json`."""
    ours = _read_json(ckpt_dir / "ckpteval.json")
    if ours:
        return _int_or_none(ours.get("step")), _int_or_none(ours.get("tokens_seen"))
    hf = _read_json(ckpt_dir / "trainer_state.json")
    step, tokens = _int_or_none(hf.get("global_step")), _int_or_none(hf.get("num_input_tokens_seen"))
    # HF Trainer writes num_input_tokens_seen=0 when it was not counting: unknown, not zero.
    return step, (tokens if tokens else None)


def _int_or_none(value) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ---------------------------------------------------------------------------------------------- format


def _safetensors_header(path: Path) -> dict:
    """The JSON header; raises CkptEvalError when the file is shorter than the header says (a partial copy)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CkptEvalError(f"checkpoint file {path} is unreadable or truncated ({e}): re-copy or re-save it") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + n + end:
        raise CkptEvalError(f"checkpoint file {path} is truncated ({path.stat().st_size} bytes, header needs "
                            f"{8 + n + end}): it is still being written, or the copy was cut short")
    return header


def hf_weight_files(ckpt_dir: Path) -> list[Path]:
    """The weight files of an HF dir, checked present (and safetensors checked whole). Raises when incomplete."""
    for index_name in HF_INDEXES:
        index = ckpt_dir / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not weight_map:
                raise CkptEvalError(f"checkpoint {ckpt_dir} is incomplete: {index_name} has no weight_map "
                                    "(still being written?)")
            files = [ckpt_dir / name for name in dict.fromkeys(weight_map.values())]
            break
    else:
        files = [ckpt_dir / n for n in HF_SINGLE if (ckpt_dir / n).is_file()][:1]
        shards = sorted(p.name for p in ckpt_dir.iterdir() if SHARD_RE.match(p.name))
        if not files and shards:
            raise CkptEvalError(f"checkpoint {ckpt_dir} is incomplete: shards {shards[0]}... but no "
                                f"{HF_INDEXES[0]} (still being written, or the save crashed)")
    for f in files:
        if not f.is_file():
            raise CkptEvalError(f"checkpoint {ckpt_dir} is incomplete: its index names {f.name}, which is missing "
                                "(still being written, or a shard was not copied)")
        if f.suffix == ".safetensors":
            _safetensors_header(f)
    return files


def read_dcp_metadata(ckpt_dir: Path):
    """DCP `.metadata`, with every storage file it names present and long enough; raises when incomplete."""
    from ckpteval.checkpoint.safe_pickle import load_dcp_metadata

    metadata = load_dcp_metadata(ckpt_dir)  # allow-listed: a crafted .metadata cannot run code
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        f = ckpt_dir / name
        if not f.is_file() or f.stat().st_size < size:
            raise CkptEvalError(f"checkpoint {ckpt_dir} is incomplete: .metadata names {name}, which is "
                                f"{'missing' if not f.is_file() else 'truncated'}")
    return metadata


def _check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CkptEvalError(f"checkpoint {path} is unreadable: {e}") from None
    if magic != b"GGUF":
        raise CkptEvalError(f"checkpoint {path} is not a GGUF file (no GGUF magic): it is truncated or mis-named")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CkptEvalError("reading a .gguf checkpoint needs the gguf package: pip install 'ckpteval[gguf]'") from None
    try:
        GGUFReader(str(path))  # memory-maps and parses the tensor table: a cut-short file fails here
    except Exception as e:
        raise CkptEvalError(f"checkpoint {path} is an incomplete or corrupt GGUF file ({e})") from None


def _detect(path: Path) -> tuple[str, Path]:
    """(format, checkpoint path) after the completeness checks; raises CkptEvalError naming what is wrong."""
    if not path.exists():
        raise CkptEvalError(f"checkpoint {path} does not exist: check the path ({EXPECTED})")
    if path.is_file():
        if path.suffix == ".gguf":
            _check_gguf(path)
            return "gguf", path
        raise CkptEvalError(f"checkpoint {path} is a file but not a .gguf: {EXPECTED}")
    names = sorted(p.name for p in path.iterdir())
    if ".metadata" in names:
        read_dcp_metadata(path)
        return "dcp", path
    if any(n.endswith(".distcp") for n in names):
        raise CkptEvalError(f"checkpoint {path} is incomplete: no .metadata (still being written, or the save crashed)")
    if hf_weight_files(path):
        return "hf", path
    ggufs = [n for n in names if n.endswith(".gguf")]
    if len(ggufs) == 1:
        _check_gguf(path / ggufs[0])
        return "gguf", path / ggufs[0]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "nothing"
    raise CkptEvalError(f"checkpoint {path} is not a recognised checkpoint: found {shown}; {EXPECTED}")


def check_complete(path) -> tuple[bool, str]:
    """(complete?, reason) without reading tensors: for watchers deciding whether a checkpoint is ready yet."""
    try:
        _detect(Path(path).expanduser())
    except CkptEvalError as e:
        return False, str(e)
    return True, ""


# ---------------------------------------------------------------------------------------------- inspect


def _config_dir(ckpt: Path) -> Path | None:
    """config.json in the checkpoint dir, else its parent (a run dir holding step_N DCP dirs), else None."""
    for d in (ckpt, ckpt.parent):
        if (d / "config.json").is_file():
            return d
    return None


def _has_tokenizer(d: Path) -> bool:
    return any((d / n).is_file() for n in TOKENIZER_FILES)


def _gguf_has_tokenizer(path: Path) -> bool:
    from gguf import GGUFReader

    return "tokenizer.ggml.tokens" in GGUFReader(str(path)).fields


def _find_tokenizer(fmt: str, ckpt: Path, override: str | None) -> Path | None:
    if override:
        tok = Path(override).expanduser()
        if (tok.is_dir() and _has_tokenizer(tok)) or (tok.is_file() and tok.suffix in (".json", ".gguf")):
            return tok
        raise CkptEvalError(f"tokenizer={override} is not a tokenizer: pass a dir with tokenizer.json (or "
                            "tokenizer.model / vocab.json), or a tokenizer.json file")
    if fmt == "gguf":
        if _gguf_has_tokenizer(ckpt):
            return ckpt
        return ckpt.parent if _has_tokenizer(ckpt.parent) else None
    return next((d for d in (ckpt, ckpt.parent) if _has_tokenizer(d)), None)


def dcp_model_prefix(keys) -> str:
    """"model." when the weights sit under a "model" entry (our trainer's {"model": ..., "optim": ...}), "" when
    they are top-level (torchtitan-like). Top-level HF names also start with "model." (model.layers.0...), so
    the tell is what follows: our layout nests a whole *ForCausalLM state dict (model.model..., model.lm_head...)."""
    keys = list(keys)
    under = [k[len("model."):] for k in keys if k.startswith("model.")]
    if not under:
        return ""
    tops = {k.split(".", 1)[0] for k in keys}
    if tops & TRAINER_ENTRIES:
        return "model."
    if "lm_head" in tops:  # a top-level head beside model.* = top-level HF names
        return ""
    return "model." if any(k.startswith(("model.", "lm_head.")) for k in under) else ""


def inspect_checkpoint(path, tokenizer_override: str | None = None) -> CheckpointInfo:
    """Detect the format, check the checkpoint is complete, and find its step, config and tokenizer."""
    if "://" in str(path):  # s3://, gs://, ...: a local copy of just what evaluation reads
        from ckpteval.checkpoint.remote import materialize
        path = materialize(str(path))
    fmt, ckpt = _detect(Path(str(path)).expanduser().resolve())
    meta_dir = ckpt if ckpt.is_dir() else None
    step, tokens = _metadata_step_tokens(meta_dir) if meta_dir else (None, None)
    path_step = parse_step(ckpt)
    prefix = ""
    if fmt == "dcp":
        prefix = dcp_model_prefix(read_dcp_metadata(ckpt).state_dict_metadata)
    return CheckpointInfo(
        path=ckpt, format=fmt, step=path_step if path_step is not None else step, tokens_seen=tokens,
        config_dir=None if fmt == "gguf" else _config_dir(ckpt),
        tokenizer_path=_find_tokenizer(fmt, ckpt, tokenizer_override), dcp_prefix=prefix,
    )


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

"""Any checkpoint the format registry reads (HF, DCP, GGUF, nanoGPT, Lightning, ...) -> a verified HF dir, once.

    convert_to_hf(inspect_checkpoint("outputs/.../step_300"), "exports/step_300", model_cfg, "float32", 1e-5)

The output holds config.json, model.safetensors, the tokenizer and `ckpteval_source.json` (the source path, its
`checkpoint_identity`, the dtype and the verified logits difference). It is saved into a hidden staging dir,
reloaded there with plain `transformers` and compared with the source model on a fixed batch; only a
conversion within tolerance is published (one rename), so the output dir is complete and verified or absent.
Converting again an unchanged checkpoint to the same dir and dtype is a no-op; a changed checkpoint (any file
rewritten) is converted again and replaces the old output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ckpteval.checkpoint.detect import checkpoint_identity
from ckpteval.checkpoint.formats._common import position_limit
from ckpteval.checkpoint.formats._moe import not_in_transformers
from ckpteval.checkpoint.formats.hf import hf_weight_files
from ckpteval.checkpoint.info import CheckpointInfo
from ckpteval.checkpoint.load import build_config, load_model, load_tokenizer
from ckpteval.checkpoint.save import save_hf_atomic
from ckpteval.dtypes import dtype_name, torch_dtype
from ckpteval.errors import CkptEvalError
from ckpteval.fsutil import publish_dir

log = logging.getLogger(__name__)

RECORD = "ckpteval_source.json"
VERIFY_BATCH, VERIFY_LEN = 2, 32


def default_output(info: CheckpointInfo, outputs: str | Path = "outputs") -> Path:
    """`<outputs>/converted/<name>-<hash of the source path>`: never beside the checkpoint, where sweeps and the
    watcher would take a `step_300_hf` dir for another checkpoint."""
    import hashlib

    src = info.path.resolve()
    tag = hashlib.sha1(str(src).encode()).hexdigest()[:8]
    return Path(outputs) / "converted" / f"{src.stem if src.is_file() else src.name}-{tag}"


def read_record(out) -> dict | None:
    """The conversion record of an output dir, None when it has none (not written by us, or unfinished)."""
    try:
        data = json.loads((Path(out) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_converted(info: CheckpointInfo, out, dtype) -> bool:
    """True when `out` already holds a verified conversion of this exact checkpoint (same files) in `dtype`."""
    record = read_record(out)
    if not record or record.get("source_identity") != source_identity(info):
        return False
    if record.get("dtype") != dtype_name(torch_dtype(dtype)):
        return False
    try:
        return bool(hf_weight_files(Path(out)))
    except CkptEvalError:
        return False


def source_identity(info: CheckpointInfo) -> str:
    """`checkpoint_identity` of the checkpoint, and of its base for an adapter (a rewritten base converts again)."""
    identity = checkpoint_identity(info.path)
    return identity if info.base is None else f"{identity}+{checkpoint_identity(info.base.path)}"


def verification_batch(config) -> torch.Tensor:
    """A fixed batch of token ids, the same for every conversion of the same architecture."""
    vocab = int(config.vocab_size)
    length = min(VERIFY_LEN, position_limit(config) or VERIFY_LEN)  # None: no limit (absent, or -1)
    return torch.randint(0, vocab, (VERIFY_BATCH, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch.to(next(model.parameters()).device)).logits.float().cpu()


def convert_to_hf(info: CheckpointInfo, out, model_cfg=None, dtype="float32", tolerance: float = 1e-5) -> Path:
    """Write `info` as a verified HF dir at `out` (no-op when it is already there); returns `out`.

    The check: logits of the source model (with its weights rounded to `dtype`, i.e. exactly what is stored)
    against the converted dir loaded by `AutoModelForCausalLM.from_pretrained` in float32, on a fixed batch; the
    max abs difference is printed and anything above `tolerance` is an error (nothing is published).
    """
    out = Path(out).expanduser().resolve()
    dtype = torch_dtype(dtype)
    if tolerance < 0:
        raise CkptEvalError(f"convert.tolerance={tolerance} must be >= 0")
    if out == info.path or info.path in out.parents:
        raise CkptEvalError(f"convert.out={out} is inside the checkpoint {info.path}: write the HF dir elsewhere")
    if is_converted(info, out, dtype):
        record = read_record(out) or {}
        print(f"already converted: {out} holds {info.path} ({dtype_name(dtype)}, verified max abs logits diff "
              f"{record.get('max_abs_diff', float('nan')):.3g}); nothing to do", flush=True)
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and read_record(out) is None)):
        raise CkptEvalError(f"convert.out={out} exists and was not written by mode=convert: pick another path or "
                            "remove it")
    identity = source_identity(info)
    why = not_in_transformers(build_config(info, model_cfg))
    if why:  # stock transformers would load the HF dir with another function (formats/_moe.py)
        raise CkptEvalError(f"{info.path} cannot be converted to an HF dir that stock transformers evaluates the same: "
                            f"{why}; mode=loss and mode=harness evaluate it exactly. Nothing was written")
    model = load_model(info, model_cfg, device="cpu", dtype=torch.float32)
    tokenizer = load_tokenizer(info)
    if tokenizer is None:
        log.warning("no tokenizer in or beside %s: the HF dir will have none (pass tokenizer=PATH)", info.path)
    if dtype != torch.float32:
        _round_parameters(model, dtype)  # the reference is what will be stored: weights rounded to `dtype`
    batch = verification_batch(model.config)
    reference = _logits(model, batch)

    staging = out.parent / f".{out.name}.{os.getpid()}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_hf_atomic(staging, model, tokenizer, dtype=dtype)
        del model
        diff = _verify(staging, batch, reference)
        print(f"verified {out.name}: max abs logits diff {diff:.3g} (source vs converted, "
              f"{batch.shape[0]}x{batch.shape[1]} tokens, tolerance {tolerance:g})", flush=True)
        if not diff <= tolerance:
            raise CkptEvalError(f"conversion of {info.path} does not reproduce its logits: max abs diff {diff:.3g} > "
                                f"convert.tolerance={tolerance:g}; nothing was written")
        record = {"source_path": str(info.path), "source_identity": identity, "source_format": info.format,
                  "step": info.step, "tokens_seen": info.tokens_seen, "dtype": dtype_name(dtype),
                  "max_abs_diff": diff, "tolerance": tolerance}
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        publish_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


@torch.no_grad()
def _round_parameters(model, dtype: torch.dtype) -> None:
    """Round weights to `dtype` and back; buffers (rotary inv_freq) are recomputed in float32 on load, so they
    are left alone."""
    for param in model.parameters():
        param.copy_(param.to(dtype).to(param.dtype))


def _verify(hf_dir: Path, batch: torch.Tensor, reference: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    try:
        return float((_logits(converted, batch) - reference).abs().max())
    finally:
        del converted

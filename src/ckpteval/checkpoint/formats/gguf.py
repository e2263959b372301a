"""GGUF files (llama.cpp's format), read through transformers' own GGUF loader.

    ckpt=run/step_50/model.gguf      # or the dir holding exactly one .gguf

Architecture: the GGUF metadata (transformers maps it to a config). Read: the tensors, dequantised to float and
mapped to transformers names by transformers (which also undoes llama.cpp's q/k row permutation).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError


def _ggufs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == ".gguf") if path.is_dir() else []


def check_gguf(path: Path) -> None:
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
    except Exception as e:  # noqa: BLE001 - the reader raises anything on a corrupt file
        raise CkptEvalError(f"checkpoint {path} is an incomplete or corrupt GGUF file ({e})") from None


class GGUFFormat(CheckpointFormat):
    name = "gguf"
    description = "a .gguf file (or a dir holding exactly one)"

    def looks_like(self, path: Path) -> bool:
        return (path.is_file() and path.suffix == ".gguf") or len(_ggufs(path)) == 1

    def resolve(self, path: Path) -> Path:
        found = _ggufs(path)
        return found[0] if len(found) == 1 else path

    def check_complete(self, path: Path) -> None:
        check_gguf(self.resolve(path))

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        from transformers import AutoConfig

        path = self.resolve(path)
        try:
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except (ValueError, KeyError, OSError) as e:
            raise CkptEvalError(f"cannot read the architecture of GGUF checkpoint {path}: {e}") from None
        return Architecture(config, f"the GGUF metadata of {path.name}")

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]] | None:
        return None  # architecture and tensors come from the same file; transformers maps them together

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        path = self.resolve(path)
        with torch.device("meta"):
            names = AutoModelForCausalLM.from_config(config)  # only for transformers' GGUF -> HF name map
        try:
            return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=names)["tensors"]
        except (ValueError, RuntimeError, KeyError) as e:
            raise CkptEvalError(f"cannot load GGUF checkpoint {path}: {e}") from None

    def tokenizer_dirs(self, path: Path) -> list[Path]:
        return [self.resolve(path).parent]

"""PyTorch Lightning `.ckpt` files (`ModelCheckpoint`'s `epoch=0-step=10.ckpt`) of a LightningModule that holds a
transformers causal LM as an attribute (`self.model = AutoModelForCausalLM...`).

    ckpt='lightning_logs/version_0/checkpoints/epoch=0-step=10.ckpt'

The file is a torch pickle {"state_dict", "global_step", "epoch", "hyper_parameters", "optimizer_states", ...},
read with the weights-only allow-list; Lightning's `AttributeDict` (the hyper_parameters type) is read as a plain
dict stand-in, so nothing of Lightning is imported or called. Architecture: config.json beside the file (or one
dir up), else `hyper_parameters` when they hold a transformers config dict (a `model_type` key, at the top or
one level down), else the `model` group (checked against the tensors first). Read: `state_dict` with the module's
attribute prefix (`model.`) removed; optimizer_states and loops are never put into the model.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from ckpteval.checkpoint.formats import _common
from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError

# Lightning's hyper_parameters container, under every module path it has lived at: read as a plain dict.
STAND_INS = [(dict, name) for name in ("lightning.fabric.utilities.data.AttributeDict",
                                       "lightning_fabric.utilities.data.AttributeDict",
                                       "pytorch_lightning.utilities.parsing.AttributeDict",
                                       "lightning.pytorch.utilities.parsing.AttributeDict")]


@lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int, size: int) -> dict:
    from ckpteval.checkpoint.safe_pickle import torch_load

    data = torch_load(path, extra_globals=STAND_INS, mmap=True)
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise CkptEvalError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict entry): point ckpt= at "
                            "the .ckpt ModelCheckpoint wrote, or set ckpt_format")
    return data


def read_ckpt(path: Path) -> dict:
    st = path.stat()
    return _read(str(path), st.st_mtime_ns, st.st_size)


def _hparams_config(hparams) -> dict | None:
    """A transformers config dict inside hyper_parameters: the hparams themselves or one value of them."""
    if not isinstance(hparams, dict):
        return None
    if "model_type" in hparams:
        return hparams
    return next((v for v in hparams.values() if isinstance(v, dict) and "model_type" in v), None)


class LightningFormat(CheckpointFormat):
    name = "lightning"
    description = "a PyTorch Lightning .ckpt file (ModelCheckpoint's epoch=E-step=S.ckpt)"

    def looks_like(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".ckpt"

    def check_complete(self, path: Path) -> None:
        read_ckpt(path)

    def step_tokens(self, path: Path) -> tuple[int | None, int | None]:
        return _common.int_or_none(read_ckpt(path).get("global_step")), None

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        found = _common.config_dir(path.parent, path.parent.parent)
        if found is not None:
            return _common.config_json_arch(found)
        hparams = _hparams_config(read_ckpt(path).get("hyper_parameters"))
        if hparams is not None:
            return _common.config_from_dict(dict(hparams), f"the hyper_parameters in {path.name}")
        return _common.model_group_arch(model_cfg, path, "Lightning", f"no config.json beside {path.name} and no "
                                        "transformers config in its hyper_parameters")

    def _state(self, path: Path) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in read_ckpt(path)["state_dict"].items() if isinstance(v, torch.Tensor)}
        prefix = _common.hf_prefix(state)
        return {k[len(prefix):]: v for k, v in state.items()}

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._state(path).items()}

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._state(path).items()}

    def tokenizer_dirs(self, path: Path) -> list[Path]:
        return [path.parent, path.parent.parent, path.parent.parent.parent]

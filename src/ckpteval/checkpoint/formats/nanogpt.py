"""nanoGPT `ckpt.pt` files (karpathy/nanoGPT train.py), evaluated as transformers' GPT2LMHeadModel.

    ckpt=out-shakespeare/ckpt.pt        # or the out_dir holding it

The file is a torch pickle {"model", "model_args", "iter_num", "best_val_loss", "optimizer", "config"}, read
with the weights-only allow-list (nothing in it can run code). Architecture: `model_args` (n_layer, n_head,
n_embd, block_size, bias, vocab_size). Step: `iter_num` (nanoGPT overwrites one ckpt.pt, so the name carries
no step); tokens seen: iter_num x gradient_accumulation_steps x batch_size x block_size from `config`.

Mapping onto GPT2LMHeadModel: nanoGPT's attention/MLP projections are nn.Linear ([out, in]) where GPT-2 uses
Conv1D ([in, out]), so c_attn/c_proj/c_fc weights are transposed; `bias=False` models have no biases while
GPT-2 always adds them, so zero biases are filled in (adding 0 changes nothing); nanoGPT's GELU is the exact one
(activation "gelu", not GPT-2's tanh "gelu_new"); LayerNorm eps 1e-5; lm_head is tied to wte. The `_orig_mod.`
prefix torch.compile adds, and the causal-mask buffers `attn.bias`, are dropped.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from ckpteval.checkpoint.formats import _common
from ckpteval.checkpoint.formats.base import Architecture, CheckpointFormat
from ckpteval.errors import CkptEvalError

FILE = "ckpt.pt"
TRANSPOSED = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
NEEDED = ("model", "model_args")
COMPILE_PREFIX = "_orig_mod."


@lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int, size: int) -> dict:
    """The whole pickle, tensors memory-mapped (cheap: only the pages read are loaded); cached per file version."""
    from ckpteval.checkpoint.safe_pickle import torch_load

    data = torch_load(path, mmap=True)
    if not isinstance(data, dict) or any(k not in data for k in NEEDED):
        raise CkptEvalError(f"checkpoint {path} is not a nanoGPT ckpt.pt (it needs {', '.join(NEEDED)}; it holds "
                            f"{sorted(data)[:8] if isinstance(data, dict) else type(data).__name__}): "
                            "point ckpt= at the file nanoGPT's train.py wrote, or set ckpt_format")
    return data


def read_ckpt(path: Path) -> dict:
    st = path.stat()
    return _read(str(path), st.st_mtime_ns, st.st_size)


def _model_state(data: dict) -> dict[str, torch.Tensor]:
    state = data["model"]
    return {k.removeprefix(COMPILE_PREFIX): v for k, v in state.items()
            if not k.endswith((".attn.bias", ".attn.masked_bias"))}


class NanoGPTFormat(CheckpointFormat):
    name = "nanogpt"
    description = "a nanoGPT ckpt.pt (dict with model, model_args, iter_num), or the out_dir holding it"

    def looks_like(self, path: Path) -> bool:
        return (path.is_file() and path.suffix == ".pt") or (path.is_dir() and (path / FILE).is_file()
                                                             and not any(path.glob("*.safetensors")))

    def resolve(self, path: Path) -> Path:
        return path / FILE if path.is_dir() else path

    def check_complete(self, path: Path) -> None:
        read_ckpt(self.resolve(path))  # torch.save writes a zip whose directory comes last: a partial file fails

    def step_tokens(self, path: Path) -> tuple[int | None, int | None]:
        data = read_ckpt(self.resolve(path))
        step = _common.int_or_none(data.get("iter_num"))
        cfg = data.get("config") if isinstance(data.get("config"), dict) else {}
        per_iter = [_common.int_or_none(cfg.get(k)) for k in ("gradient_accumulation_steps", "batch_size",
                                                               "block_size")]
        tokens = step * per_iter[0] * per_iter[1] * per_iter[2] if step is not None and all(per_iter) else None
        return step, tokens

    def architecture(self, path: Path, model_cfg=None) -> Architecture:
        from transformers import GPT2Config

        path = self.resolve(path)
        args = read_ckpt(path)["model_args"]
        try:
            config = GPT2Config(vocab_size=int(args["vocab_size"]), n_positions=int(args["block_size"]),
                                n_embd=int(args["n_embd"]), n_layer=int(args["n_layer"]), n_head=int(args["n_head"]),
                                activation_function="gelu", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                                architectures=["GPT2LMHeadModel"], bos_token_id=None, eos_token_id=None)
        except (KeyError, TypeError, ValueError) as e:
            raise CkptEvalError(f"checkpoint {path}: model_args {args} is not a nanoGPT GPTConfig ({e})") from None
        return Architecture(config, f"nanoGPT model_args in {path.name}")

    def tensor_specs(self, path: Path, config) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._mapped(path, config).items()}

    def read_state(self, path: Path, config) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._mapped(path, config).items()}

    def _mapped(self, path: Path, config) -> dict[str, torch.Tensor]:
        """GPT2LMHeadModel names and layouts (transposes are views of the mmapped tensors: no copy here)."""
        state = _model_state(read_ckpt(self.resolve(path)))
        out = {}
        for name, tensor in state.items():
            out[name] = tensor.t() if name.endswith(TRANSPOSED) and tensor.dim() == 2 else tensor
        for i in range(config.n_layer):  # bias=False models: GPT-2 always has biases, zero ones are exact
            block = f"transformer.h.{i}"
            for mod, size in ((".ln_1", config.n_embd), (".ln_2", config.n_embd), (".attn.c_attn", 3 * config.n_embd),
                              (".attn.c_proj", config.n_embd), (".mlp.c_fc", 4 * config.n_embd),
                              (".mlp.c_proj", config.n_embd)):
                if f"{block}{mod}.weight" in out:
                    out.setdefault(f"{block}{mod}.bias", torch.zeros(size))
        if "transformer.ln_f.weight" in out:
            out.setdefault("transformer.ln_f.bias", torch.zeros(config.n_embd))
        return out

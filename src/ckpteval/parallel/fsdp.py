"""FSDP2: `fully_shard` per decoder layer, then the root, over the "dp" dim of the mesh.

    torchrun --nproc_per_node=4 run.py mode=loss parallel=fsdp ckpt=PATH data=local ...
    torchrun --nproc_per_node=2 run.py mode=train_eval parallel=fsdp parallel.param_dtype=bfloat16 ...

The root is a small `ShardedCausalLM` wrapper around the transformers model rather than the model itself:
FSDP all-gathers the root's own parameters (embeddings, final norm, LM head) in the root's forward hooks, and
the memory-lean loss (decoder once, vocabulary projection in chunks) calls the decoder and the head directly,
so it has to run *inside* a root forward. The wrapper's forward does either job: with `targets` it returns
(nll_sum, count), without it is the plain causal LM call training uses. `.module` is the transformers model,
so state dicts keep the plain names every other layout and checkpoint uses.
"""

from __future__ import annotations

import torch
from torch import nn

from ckpteval.evaluation.loss import Scorer, causal_lm_scorer


class ShardedCausalLM(nn.Module):
    def __init__(self, module: nn.Module, logits_chunk: int = 0, doc_sep: int | None = None):
        super().__init__()
        self.module = module
        self._nll = causal_lm_scorer(module, logits_chunk, doc_sep)

    @property
    def config(self):
        return self.module.config

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, **kwargs):
        if targets is None:
            return self.module(input_ids=input_ids, **kwargs)
        nll, count = self._nll(input_ids, targets)
        return torch.stack([nll, count])

    def scorer(self) -> Scorer:
        def score(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            both = self(inputs, targets=targets)
            return both[0], both[1]

        return score


def mixed_precision(parallel_cfg):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from ckpteval.dtypes import torch_dtype

    param = torch_dtype(parallel_cfg.param_dtype) if parallel_cfg.param_dtype else None
    reduce = torch_dtype(parallel_cfg.reduce_dtype) if parallel_cfg.reduce_dtype else None
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def shard(layers, root: nn.Module, dp_mesh, parallel_cfg) -> nn.Module:
    """`fully_shard` each of `layers`, then `root` (it takes what is left: embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision(parallel_cfg)
    for layer in layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp)
    fully_shard(root, mesh=dp_mesh, mp_policy=mp)
    return root


def apply_fsdp(model: nn.Module, dp_mesh, parallel_cfg, logits_chunk: int = 0,
               doc_sep: int | None = None) -> ShardedCausalLM:
    """Shard each decoder layer, then the root wrapper (what is left: embeddings, norm, head)."""
    decoder = model.get_decoder()
    layers = decoder.layers if hasattr(decoder, "layers") else decoder.h  # Llama-likes; GPT-2 (nanoGPT checkpoints)
    return shard(layers, ShardedCausalLM(model, logits_chunk, doc_sep), dp_mesh, parallel_cfg)

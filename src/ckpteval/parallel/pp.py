"""Pipeline parallel: each rank of the "pp" dim owns a contiguous slice of decoder layers.

    torchrun --nproc_per_node=2 run.py mode=loss parallel=pp parallel.microbatches=4 ckpt=PATH ...
    torchrun --nproc_per_node=2 run.py mode=train_eval parallel=pp parallel.microbatches=4 ...   # `PipelineTrainer`

The first stage also owns the token embedding, the last the final norm and the LM head. A batch is split into
`parallel.microbatches` microbatches and run with `torch.distributed.pipelining` (`schedule.eval`, forward
only). The last stage turns its hidden states into (NLL sum, target count) with the same chunked projection as
every other layout and broadcasts the pair over the pipeline group, so every rank returns the same numbers and
`run_eval` reduces them over the data-parallel ranks as usual.

Tensor names stay those of the full transformers model (layers become a ModuleDict keyed by their original
index), so HF, GGUF and DCP checkpoints load into a stage with the same names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ckpteval.errors import CkptEvalError
from ckpteval.evaluation.loss import Scorer, chunked_nll
from ckpteval.parallel.mesh import check_microbatches, split_layers

SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")


class DecoderStage(nn.Module):
    """One pipeline stage of a Llama-family causal LM: [embed] -> layers[a:b] -> [norm]; hidden states out."""

    def __init__(self, lm: nn.Module, layers: range, first: bool, last: bool):
        super().__init__()
        decoder = lm.get_decoder()
        decoder.layers = nn.ModuleDict({str(i): decoder.layers[i] for i in layers})
        if not first:
            decoder.embed_tokens = None
        if not last:
            decoder.norm = None
            lm.lm_head = None
        self.lm = lm  # pruned in place: state-dict names stay the full model's
        self.first, self.last = first, last
        self.emit_logits = False  # True (training): the last stage also applies the head, float32 logits out
        types = getattr(lm.config, "layer_types", None)
        self.layer_types = {i: (types[i] if types else "full_attention") for i in layers}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        decoder = self.lm.get_decoder()
        hidden = decoder.embed_tokens(x) if self.first else x
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs = {"config": self.lm.config, "inputs_embeds": hidden, "attention_mask": None,
                  "past_key_values": None, "position_ids": position_ids}
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in self.layer_types.values():
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        rope = decoder.rotary_emb(hidden, position_ids=position_ids)
        for name, layer in decoder.layers.items():
            hidden = layer(hidden, attention_mask=masks[self.layer_types[int(name)]], position_embeddings=rope,
                           position_ids=position_ids, use_cache=False)
        if not self.last:
            return hidden
        hidden = decoder.norm(hidden)
        return self.lm.lm_head(hidden).float() if self.emit_logits else hidden


def check_pp_model(model_config) -> None:
    decoder_types = {"llama", "mistral", "qwen2", "qwen3", "olmo2", "smollm3"}
    if getattr(model_config, "model_type", None) not in decoder_types:
        raise CkptEvalError(f"parallel=pp supports Llama-family decoders ({', '.join(sorted(decoder_types))}), not "
                            f"model_type={getattr(model_config, 'model_type', None)}: use parallel=fsdp instead")


def build_stage(lm: nn.Module, pp_rank: int, pp_size: int, doc_sep: int | None = None) -> DecoderStage:
    """Prune `lm` to the layers of stage `pp_rank` (of `pp_size`)."""
    check_pp_model(lm.config)
    if doc_sep is not None:
        raise CkptEvalError("eval.doc_mask=true is not supported with parallel=pp (stages pass hidden states "
                            "only): use parallel=fsdp or tp, or eval.doc_mask=false")
    slices = split_layers(lm.config.num_hidden_layers, pp_size)
    return DecoderStage(lm, slices[pp_rank], first=pp_rank == 0, last=pp_rank == pp_size - 1)


def pipeline_scorer(stage_module: DecoderStage, parallel_cfg, eval_cfg, dims, mesh, device: torch.device,
                    dtype: torch.dtype) -> Scorer:
    """A scorer that runs one batch through the pipeline; every rank returns the last stage's per-token
    (nll, mask)."""
    from torch.distributed.pipelining import PipelineStage

    check_microbatches(eval_cfg.batch_size, parallel_cfg.microbatches)
    schedule_cls = _schedule_class(parallel_cfg)
    pp_rank, pp_group = mesh.get_local_rank("pp"), mesh.get_group("pp")
    micro = eval_cfg.batch_size // parallel_cfg.microbatches
    hidden = stage_module.lm.config.hidden_size
    seq = eval_cfg.seq_len
    # Static shapes (every evaluation batch has the same shape): no runtime shape inference between stages.
    example_in = (torch.empty(micro, seq, dtype=torch.long, device="meta") if stage_module.first
                  else torch.empty(micro, seq, hidden, dtype=dtype, device="meta"))
    logits_out = stage_module.last and stage_module.emit_logits
    example_out = (torch.empty(micro, seq, stage_module.lm.config.vocab_size, dtype=torch.float32, device="meta")
                   if logits_out else torch.empty(micro, seq, hidden, dtype=dtype, device="meta"))
    stage = PipelineStage(stage_module, pp_rank, dims.pp, device, input_args=example_in, output_args=example_out,
                          group=pp_group)
    schedule = schedule_cls(stage, n_microbatches=parallel_cfg.microbatches)
    head = (nn.Identity() if logits_out else stage_module.lm.lm_head) if stage_module.last else None
    chunk = eval_cfg.logits_chunk

    def score(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = schedule.eval(inputs) if stage_module.first else schedule.eval()
        if stage_module.last:
            nll, count = chunked_nll(out, head, targets, chunk)
            both = torch.stack([nll, count])
        else:
            both = torch.zeros(2, *targets.shape, dtype=torch.float64, device=device)  # per-token (nll, mask)
        dist.broadcast(both, group=pp_group, group_src=dims.pp - 1)
        return both[0], both[1]

    return score


def _schedule_class(parallel_cfg):
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

    try:
        schedule_cls = get_schedule_class(str(parallel_cfg.pp_schedule))
    except ValueError as e:
        raise CkptEvalError(f"parallel.pp_schedule={parallel_cfg.pp_schedule} is unknown ({e})") from None
    if not issubclass(schedule_cls, PipelineScheduleSingle):
        raise CkptEvalError(f"parallel.pp_schedule={parallel_cfg.pp_schedule} needs several stages per rank, which "
                            f"ckpteval does not build: use one of {', '.join(SINGLE_STAGE_SCHEDULES)}")
    return schedule_cls


class PipelineTrainer(nn.Module):
    """A pipeline stage for `train_eval`: `pipeline_step` replaces forward + backward of one micro-batch.

    The last stage runs the head inside its forward and computes each pipeline microbatch's cross-entropy (in
    float32) divided by microbatches x grad_accum, so the accumulated gradients are those of the batch mean,
    exactly as one process computes them; the batch's mean loss is broadcast over the pipeline so every rank
    logs the same number. With several pipelines (dp > 1) each stage is FSDP-sharded over its dp group.
    `.module` is the pruned transformers model (full-model tensor names for checkpoints), `grad_norm_group` the
    group over which the gradient norm is summed (each rank holds different layers).
    """

    def __init__(self, stage_module: DecoderStage, cfg, dims, mesh, device: torch.device):
        super().__init__()
        from torch.distributed.pipelining import PipelineStage

        check_microbatches(cfg.train.batch_size, cfg.parallel.microbatches, "train.batch_size")
        if getattr(stage_module.lm.config, "tie_word_embeddings", False):
            raise CkptEvalError("parallel=pp cannot train a model with tied embeddings (the embedding and the head "
                                "live on different stages): use parallel=fsdp, or model.tie_word_embeddings=false")
        self.stage_module = stage_module
        self.module = stage_module.lm
        self._cfg, self._dims, self._mesh, self._device = cfg, dims, mesh, device
        self.grad_norm_group = mesh.get_group("pp")
        self._scale = cfg.parallel.microbatches * cfg.train.grad_accum
        stage_module.emit_logits = True  # the head runs inside the (FSDP-managed) stage, for eval too
        if dims.dp > 1:
            from ckpteval.parallel.fsdp import shard

            shard(stage_module.lm.get_decoder().layers.values(), stage_module, mesh["dp"], cfg.parallel)
        stage = PipelineStage(stage_module, mesh.get_local_rank("pp"), dims.pp, device, group=self.grad_norm_group)
        self._schedule = _schedule_class(cfg.parallel)(stage, n_microbatches=cfg.parallel.microbatches,
                                                       loss_fn=self._loss, scale_grads=False)

    @property
    def config(self):
        return self.module.config

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()) / self._scale

    def pipeline_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Forward + backward of one training micro-batch through every stage; its mean loss on every rank."""
        losses: list[torch.Tensor] = []
        if self.stage_module.first:
            self._schedule.step(inputs)
        elif self.stage_module.last:
            self._schedule.step(target=targets, losses=losses)
        else:
            self._schedule.step()
        mean = torch.zeros((), dtype=torch.float64, device=self._device)
        if self.stage_module.last:
            mean += torch.stack([x.detach().double() for x in losses]).sum() * self._scale / len(losses)
        dist.broadcast(mean, group=self.grad_norm_group, group_src=self._dims.pp - 1)
        return float(mean)

    def scorer(self) -> Scorer:
        # float32: the trained weights are float32, and so is the residual stream a stage passes on
        return pipeline_scorer(self.stage_module, self._cfg.parallel, self._cfg.eval, self._dims, self._mesh,
                               self._device, torch.float32)

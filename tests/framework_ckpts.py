"""Checkpoints written by the trainers' OWN code, and their OWN forward's loss as the reference.

Run in a subprocess (each framework wants a process group, and Megatron's saver spawns helper processes):

    python tests/framework_ckpts.py titan OUT TOKENS_DIR SEQ_LEN [--tie] [--no-job-config]
    python tests/framework_ckpts.py titan-moe OUT TOKENS_DIR SEQ_LEN    # OUT/qwen3/, OUT/deepseek/{sigmoid,softmax}/
    python tests/framework_ckpts.py megatron OUT TOKENS_DIR SEQ_LEN [--tie] [--no-args]
    python tests/framework_ckpts.py litgpt OUT TOKENS_DIR SEQ_LEN --tokenizer DIR
    python tests/framework_ckpts.py olmo_core OUT TOKENS_DIR SEQ_LEN [--tokenizer DIR]
    python tests/framework_ckpts.py megatron-moe OUT TOKENS_DIR SEQ_LEN    # OUT/{mixtral,qwen2_moe,glm4_moe}/

Each writes its checkpoints under OUT and `OUT/reference.json`: the token-weighted mean next-token loss of the
framework's own model forward over every window of the token files (window k of a file = tokens [kL, kL+L]),
float32, the same contract as `factories.reference_loss`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch

VOCAB = 512  # factories.VOCAB
DIM, HEADS, KV_HEADS, LAYERS = 64, 4, 2, 2


def _init_process_group() -> None:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo")


def windows(tokens_dir: Path, seq_len: int) -> torch.Tensor:
    out = []
    for f in sorted(Path(tokens_dir).glob("*.bin")):
        arr = np.fromfile(f, dtype=np.uint16).astype(np.int64)
        n = (len(arr) - 1) // seq_len
        out += [arr[k * seq_len: k * seq_len + seq_len + 1] for k in range(n)]
    return torch.from_numpy(np.stack(out))


def mean_loss(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits.double().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1)).item()


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm weights start at 1: move them so a mapping that mixes norms up cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------- torchtitan


def titan_model_config(tie: bool, fuse_qkv: bool, theta: float = 10000.0):
    import torchtitan.models.llama3 as L
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim

    return L.Llama3Model.Config(
        dim=DIM, vocab_size=VOCAB, enable_weight_tying=tie,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=L._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init=L._NORM_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=L._output_linear_init(DIM)),
        layers=L._build_llama3_layers(
            fuse_qkv=fuse_qkv, n_layers=LAYERS, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS,
            hidden_dim=compute_ffn_hidden_dim(DIM, multiple_of=32),
            rope=ComplexRoPE.Config(dim=DIM // HEADS, max_seq_len=256, theta=theta, scaling="none"),
            attn_backend="flex"),
    )


def write_titan(out: Path, tokens_dir: Path, seq_len: int, tie: bool, job_config: bool) -> dict:
    """A torchtitan run dir: checkpoint/step-10 (DCP: model + optimizer + lr_scheduler + train_state, by its
    CheckpointManager), checkpoint/step-20 (its HF export, last_save_in_hf), and job_config.json (its own
    Trainer.Config.to_dict() dump, as `debug.save_config_file` writes it)."""
    import dataclasses

    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.models.llama3 import Llama3StateDictAdapter
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    _init_process_group()
    torch.manual_seed(0)
    cfg = titan_model_config(tie, fuse_qkv=True)
    model = cfg.build()
    model.init_states(buffer_device=torch.device("cpu"))
    _perturb_norms(model, 1)
    with torch.no_grad():  # sharpen attention (init std 0.02 leaves it near uniform, where RoPE hardly matters)
        for name, p in model.named_parameters():
            if "qkv_linear" in name:
                p.mul_(12.0)
    opt = default_adamw(lr=1e-3).build(model_parts=[model])
    lrs = LRSchedulersContainer.Config().build(optimizers=opt, training_steps=20)
    for p in model.parameters():  # one optimizer step, so the checkpoint carries real optimizer state
        p.grad = torch.randn_like(p) * 1e-2
    opt.step()
    lrs.step()

    class TrainState:  # the Stateful torchtitan's Trainer registers as "train_state"
        step, ntokens_seen = 10, 10 * 8 * seq_len

        def state_dict(self):
            return {"step": self.step, "ntokens_seen": self.ntokens_seen}

        def load_state_dict(self, sd):
            self.step, self.ntokens_seen = sd["step"], sd["ntokens_seen"]

    ckpt = CheckpointManager.Config(enable=True, folder="checkpoint", interval=10, last_save_model_only=True,
                                    last_save_in_hf=True).build(
        dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=lrs, states={"train_state": TrainState()},
        sd_adapter=Llama3StateDictAdapter(cfg, None), base_folder=str(out))
    ckpt.save(10)
    ckpt.save(20, last_step=True)
    ckpt.close()
    if job_config:
        job = llama3_debugmodel()
        spec = dataclasses.replace(job.model_spec, flavor="tiny", model=cfg)
        job = dataclasses.replace(job, model_spec=spec, dump_folder=str(out))
        (out / "job_config.json").write_text(json.dumps(job.to_dict(), indent=2))

    w = windows(tokens_dir, seq_len)
    inputs, targets = w[:, :-1], w[:, 1:]
    positions = torch.arange(seq_len).repeat(len(w), 1)
    model.eval()
    with torch.no_grad():  # torchtitan's own forward (FlexAttention with its block-causal document mask)
        logits = model(inputs, positions, model.get_attention_masks(positions))
        hf = Llama3StateDictAdapter(cfg, None).to_hf(model.state_dict())  # its own HF mapping, as a cross-check
    torch.save(hf, out / "titan_to_hf.pt")
    return {"loss": mean_loss(logits, targets), "windows": len(w)}


# ---------------------------------------------------------------------------------------------- torchtitan MoE
MOE_EXPERTS, MOE_TOP_K, MOE_HIDDEN = 8, 2, 32


def titan_qwen3_moe_config():
    """torchtitan's own Qwen3-MoE layer builder (softmax router, route_norm, aux-loss-free expert_bias) at a tiny
    size: 2 layers, dim 64, 8 experts, top-2."""
    import torchtitan.models.qwen3 as Q
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear

    return Q.Qwen3Model.Config(
        vocab_size=VOCAB, dim=DIM, norm=Q._qwen3_norm(DIM),
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=Q._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=Q._LINEAR_INIT),
        layers=Q._build_qwen3_moe_layers(
            n_layers=LAYERS, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, head_dim=DIM // HEADS,
            moe_hidden_dim=MOE_HIDDEN, num_experts=MOE_EXPERTS, top_k=MOE_TOP_K, attn_backend="flex",
            moe_comm_backend="standard", rope=CosSinRoPE.Config(dim=DIM // HEADS, max_seq_len=256, theta=1e6)))


class float32_experts:
    """torchtitan's GroupedExperts casts its grouped-GEMM inputs to bfloat16 whatever the model dtype; inside this
    context `.bfloat16()` is the identity, so its own forward (router, dispatcher, torch._grouped_mm, combine)
    runs in float32 for the reference. Nothing else is changed."""

    def __enter__(self):
        self._real = torch.Tensor.bfloat16
        torch.Tensor.bfloat16 = lambda t, *a, **k: t

    def __exit__(self, *exc):
        torch.Tensor.bfloat16 = self._real


def _titan_moe_weights(model: torch.nn.Module, seed: int, head_scale: float = 8.0, bias_std: float = 0.15) -> None:
    """Norms moved off 1, routers sharpened (init std 0.02 routes almost uniformly), experts and head scaled up, and an
    expert_bias that changes routing for some tokens, as a load-balanced run leaves it: a reader that drops it moves
    the loss by ~1e-2 here (~1e-5 at init scale), so it is seen to be wrong."""
    _perturb_norms(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.gate.weight"):
                p.mul_(20.0)
            elif "qkv_linear" in name or "inner_experts" in name or name.endswith(("wkv_a.weight", "wq.weight")):
                p.mul_(8.0)  # a model far from uniform, whose experts matter to the loss
            elif name.startswith("lm_head"):
                p.mul_(head_scale)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias_E"):
                b.copy_(bias_std * torch.randn(b.shape, generator=g))


def _titan_train_state(seq_len: int):
    class TrainState:  # the Stateful torchtitan's Trainer registers as "train_state"
        step, ntokens_seen = 10, 10 * 8 * seq_len

        def state_dict(self):
            return {"step": self.step, "ntokens_seen": self.ntokens_seen}

        def load_state_dict(self, sd):
            self.step, self.ntokens_seen = sd["step"], sd["ntokens_seen"]

    return TrainState()


def write_titan_moe(out: Path, tokens_dir: Path, seq_len: int) -> dict:
    """A torchtitan Qwen3-MoE run dir, as for the dense model: checkpoint/step-10 (DCP with optimizer state, by its
    CheckpointManager), checkpoint/step-20 (its HF export via Qwen3StateDictAdapter), job_config.json. The
    reference: its own forward in float32 (`float32_experts`), also with its bfloat16 expert GEMMs as written, and
    with the expert_bias zeroed (what its HF export, which drops the bias, holds)."""
    import dataclasses

    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.models.qwen3 import Qwen3StateDictAdapter
    from torchtitan.models.qwen3.config_registry import qwen3_moe_debug

    _init_process_group()
    torch.manual_seed(0)
    cfg = titan_qwen3_moe_config()
    model = cfg.build()
    model.init_states(buffer_device=torch.device("cpu"))
    _titan_moe_weights(model, 3)
    opt = default_adamw(lr=1e-3).build(model_parts=[model])
    lrs = LRSchedulersContainer.Config().build(optimizers=opt, training_steps=20)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    opt.step()
    lrs.step()
    ckpt = CheckpointManager.Config(enable=True, folder="checkpoint", interval=10, last_save_model_only=True,
                                    last_save_in_hf=True).build(
        dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=lrs,
        states={"train_state": _titan_train_state(seq_len)}, sd_adapter=Qwen3StateDictAdapter(cfg, None),
        base_folder=str(out))
    ckpt.save(10)
    ckpt.save(20, last_step=True)
    ckpt.close()
    job = qwen3_moe_debug()
    job = dataclasses.replace(job, model_spec=dataclasses.replace(job.model_spec, flavor="tiny", model=cfg),
                              dump_folder=str(out))
    (out / "job_config.json").write_text(json.dumps(job.to_dict(), indent=2))

    w = windows(tokens_dir, seq_len)
    inputs, targets = w[:, :-1], w[:, 1:]
    positions = torch.arange(seq_len).repeat(len(w), 1)
    model.eval()
    ref: dict = {"windows": len(w)}
    with torch.no_grad():
        torch.save(Qwen3StateDictAdapter(cfg, None).to_hf(model.state_dict()), out / "titan_to_hf.pt")
        masks = model.get_attention_masks(positions)
        with float32_experts():
            ref["loss"] = mean_loss(model(inputs, positions, masks), targets)
        ref["loss_bf16_experts"] = mean_loss(model(inputs, positions, masks), targets)
        chosen = set()
        hook = model.layers[str(LAYERS - 1)].moe.router.register_forward_hook(
            lambda _m, _i, o: chosen.update(o[1].flatten().tolist()))
        with float32_experts():
            model(inputs[:2], positions[:2], model.get_attention_masks(positions[:2]))
        hook.remove()
        ref["experts_chosen"] = sorted(chosen)
        for layer in model.layers.values():
            layer.moe.expert_bias_E.zero_()
        with float32_experts():
            ref["loss_without_expert_bias"] = mean_loss(model(inputs, positions, masks), targets)
    return ref


def titan_deepseek_v3_config(score_func: str):
    """torchtitan's own DeepSeek-V3 layer builder at a tiny size: MLA with a q LoRA, yarn RoPE, one dense layer
    then one MoE layer with 8 experts, top-2, a shared expert and an expert_bias; the sigmoid router is also
    node-limited (2 groups, 1 chosen), renormalised and scaled by 2.5 (DeepSeek-V3's recipe), the softmax one is
    torchtitan's debugmodel recipe (no renormalisation, scale 1)."""
    import torchtitan.models.deepseek_v3 as D
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm

    sigmoid = score_func == "sigmoid"
    layers = D._build_dsv3_layers(
        n_layers=LAYERS, n_dense_layers=1, dim=DIM, n_heads=HEADS, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, mscale=0.7, dense_hidden_dim=96,
        moe_hidden_dim=MOE_HIDDEN, num_experts=MOE_EXPERTS, num_shared_experts=1, router_top_k=MOE_TOP_K,
        router_score_func=score_func, router_num_expert_groups=2 if sigmoid else None,
        router_num_limited_groups=1 if sigmoid else None, router_route_norm=sigmoid,
        router_route_scale=2.5 if sigmoid else 1.0, attn_backend="flex", moe_comm_backend="standard",
        non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(dim=8, max_seq_len=256, theta=10000.0, scaling="yarn", rope_factor=4.0,
                                beta_fast=32.0, beta_slow=1.0, original_seq_len=64))
    return D.DeepSeekV3Model.Config(
        vocab_size=VOCAB, dim=DIM,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=D._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init=D._NORM_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=D._output_linear_init(DIM)),
        layers=layers)


def write_titan_deepseek(out: Path, tokens_dir: Path, seq_len: int) -> dict:
    """Two torchtitan DeepSeek-V3 run dirs (OUT/sigmoid, OUT/softmax), each checkpoint/step-10 (DCP by its
    CheckpointManager) + job_config.json, and its own forward loss (float32 experts) with and without the bias."""
    import dataclasses

    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.models.deepseek_v3 import DeepSeekV3StateDictAdapter
    from torchtitan.models.deepseek_v3.config_registry import deepseek_v3_debugmodel

    if not torch.distributed.is_initialized():
        _init_process_group()
    w = windows(tokens_dir, seq_len)
    inputs, targets = w[:, :-1], w[:, 1:]
    positions = torch.arange(seq_len).repeat(len(w), 1)
    refs = {}
    for seed, score_func in enumerate(("sigmoid", "softmax")):
        torch.manual_seed(seed)
        cfg = titan_deepseek_v3_config(score_func)
        model = cfg.build()
        model.init_states(buffer_device=torch.device("cpu"))
        _titan_moe_weights(model, 5 + seed, head_scale=0.5, bias_std=0.5)  # its embeddings have std 1
        opt = default_adamw(lr=1e-3).build(model_parts=[model])
        lrs = LRSchedulersContainer.Config().build(optimizers=opt, training_steps=20)
        run = out / score_func
        ckpt = CheckpointManager.Config(enable=True, folder="checkpoint", interval=10).build(
            dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=lrs,
            states={"train_state": _titan_train_state(seq_len)}, sd_adapter=DeepSeekV3StateDictAdapter(cfg, None),
            base_folder=str(run))
        ckpt.save(10)
        ckpt.close()
        job = deepseek_v3_debugmodel()
        job = dataclasses.replace(job, model_spec=dataclasses.replace(job.model_spec, flavor="tiny", model=cfg),
                                  dump_folder=str(run))
        (run / "job_config.json").write_text(json.dumps(job.to_dict(), indent=2))
        model.eval()
        ref: dict = {}
        with torch.no_grad():
            torch.save(DeepSeekV3StateDictAdapter(cfg, None).to_hf(model.state_dict()), run / "titan_to_hf.pt")
            masks = model.get_attention_masks(positions)
            with float32_experts():
                ref["loss"] = mean_loss(model(inputs, positions, masks), targets)
                for layer in model.layers.values():
                    if layer.moe_enabled:
                        layer.moe.expert_bias_E.zero_()
                ref["loss_without_expert_bias"] = mean_loss(model(inputs, positions, masks), targets)
        (run / "reference.json").write_text(json.dumps(ref))
        refs[score_func] = ref
    return refs


# ---------------------------------------------------------------------------------------------- Megatron-Core


def _megatron_cpu_shims() -> None:
    """Megatron-Core assumes CUDA in three places that do no math on CPU; each fails with
    `AssertionError: Torch not compiled with CUDA enabled` (or, for the RNG tracker, `Exception: cuda rng state
    model-parallel-rng is not added`, since model_parallel_cuda_manual_seed needs CUDA). The shims only give those
    calls a CPU answer: RoPE moves `inv_freq` to `torch.cuda.current_device()`, the saver calls
    `torch.cuda.synchronize()`, attention forks the CUDA RNG for dropout (0 here, and eval mode)."""
    import contextlib

    from megatron.core import tensor_parallel

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()


def megatron_args(tie: bool) -> argparse.Namespace:
    """The Megatron-LM arguments (its own names) that describe the model, as its trainer saves them."""
    return argparse.Namespace(
        num_layers=LAYERS, hidden_size=DIM, ffn_hidden_size=160, num_attention_heads=HEADS,
        group_query_attention=True, num_query_groups=KV_HEADS, kv_channels=DIM // HEADS, swiglu=True,
        normalization="RMSNorm", norm_epsilon=1e-5, untie_embeddings_and_output_weights=not tie,
        position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0, rotary_interleaved=False,
        padded_vocab_size=VOCAB, max_position_embeddings=256, seq_length=256, add_bias_linear=False,
        add_qkv_bias=False, apply_layernorm_1p=False, params_dtype=torch.float32, iteration=10)


def write_megatron(out: Path, tokens_dir: Path, seq_len: int, tie: bool, save_args: bool) -> dict:
    """A Megatron run dir: iter_0000010 written by `dist_checkpointing.save` (torch_dist backend) from a
    `GPTModel` built with Megatron's own local layer spec, common state laid out as Megatron-LM's
    `generate_state_dict` does (`args`, `iteration`, `checkpoint_version`, `model`), and
    latest_checkpointed_iteration.txt beside it."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    _init_process_group()
    parallel_state.initialize_model_parallel(1, 1)
    _megatron_cpu_shims()
    torch.manual_seed(0)
    args = megatron_args(tie)
    cfg = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, ffn_hidden_size=args.ffn_hidden_size, kv_channels=args.kv_channels,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        layernorm_epsilon=args.norm_epsilon, add_bias_linear=False, use_cpu_initialization=True,
        params_dtype=torch.float32, bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=VOCAB, max_sequence_length=args.max_position_embeddings,
                     position_embedding_type="rope", rotary_base=args.rotary_base,
                     share_embeddings_and_output_weights=tie)
    _perturb_norms(model, 2)
    ckpt = out / "iter_0000010"
    ckpt.mkdir(parents=True)
    state = {"model": model.sharded_state_dict(), "iteration": 10, "checkpoint_version": 3.0}
    if save_args:
        state["args"] = args
    dist_checkpointing.save(state, str(ckpt))
    (out / "latest_checkpointed_iteration.txt").write_text("10")

    w = windows(tokens_dir, seq_len)
    inputs, targets = w[:, :-1], w[:, 1:]
    positions = torch.arange(seq_len).repeat(len(w), 1)
    causal = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), 1)[None, None]  # True = masked out
    model.eval()
    with torch.no_grad():  # Megatron's own forward
        logits = model(inputs, positions, causal)
    return {"loss": mean_loss(logits, targets), "windows": len(w)}


# ---------------------------------------------------------------------------------------------- litgpt


LIT_CONFIGS = {  # litgpt Config fields of the two families its pretrain targets, tiny
    "llama": {"name": "tiny-llama", "block_size": 64, "vocab_size": VOCAB, "padded_vocab_size": VOCAB,
              "n_layer": LAYERS, "n_head": HEADS, "n_embd": DIM, "n_query_groups": KV_HEADS, "rotary_percentage": 1.0,
              "parallel_residual": False, "bias": False, "norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP",
              "intermediate_size": 160, "norm_eps": 1e-5, "rope_base": 10000},
    "pythia": {"name": "tiny-pythia", "block_size": 64, "vocab_size": VOCAB, "padded_vocab_size": VOCAB,
               "n_layer": LAYERS, "n_head": HEADS, "n_embd": DIM, "rotary_percentage": 0.25, "parallel_residual": True,
               "bias": True, "norm_class_name": "LayerNorm", "mlp_class_name": "GptNeoxMLP",
               "intermediate_size": 4 * DIM, "norm_eps": 1e-5, "rope_base": 10000},
}


def _lit_data_module(tokens_dir: Path, seq_len: int):
    """A litgpt DataModule over the token windows (window k = tokens [kL, kL+L], what pretrain slices into inputs
    and targets); its train loader is Stateful, as litdata's StreamingDataLoader is, so Fabric saves its state."""
    from litgpt.data import DataModule
    from torch.utils.data import DataLoader

    class StatefulLoader(DataLoader):
        def state_dict(self):
            return {"batches_seen": 0}

        def load_state_dict(self, state):
            pass

    class Windows(DataModule):
        def connect(self, tokenizer=None, batch_size=1, max_seq_length=None, **kwargs):
            self.batch_size = batch_size

        def train_dataloader(self):
            return StatefulLoader(windows(tokens_dir, seq_len), batch_size=self.batch_size, shuffle=False)

        def val_dataloader(self):
            return DataLoader(windows(tokens_dir, seq_len), batch_size=self.batch_size)

    return Windows()


def write_litgpt(out: Path, tokens_dir: Path, seq_len: int, tokenizer_dir: Path) -> dict:
    """Two runs of litgpt's own `pretrain` loop (`litgpt.pretrain.setup`, what `litgpt pretrain --config X`
    calls), a Llama-family and a Pythia (GPT-NeoX) model, each saving step-00000002, step-00000004 and final
    (lit_model.pth + model_config.yaml + hyperparameters.yaml + the tokenizer) with its own `save_checkpoint`.

    Two things differ from a GPU run, neither touching what is saved: `torch.compile` (which `pretrain` applies)
    is turned off, since compiling needs a C++ toolchain and minutes on 2 CPUs (the same module then runs eagerly);
    and `sys.argv` is set to the equivalent `litgpt pretrain --config pretrain.yaml`, because litgpt's saver parses
    the process's command line again to write hyperparameters.yaml. The reference: each saved lit_model.pth loaded
    by litgpt's own `GPT.load_state_dict` (torch.load, as litgpt loads it) and run through litgpt's GPT forward."""
    import dataclasses

    import torch._dynamo
    import yaml
    from litgpt import GPT, Config
    from litgpt.args import EvalArgs, TrainArgs
    from litgpt.pretrain import setup

    torch._dynamo.config.disable = True  # torch.compile(model) returns the model itself
    w = windows(tokens_dir, seq_len)
    inputs, targets = w[:, :-1], w[:, 1:]
    ref = {"windows": len(w), "loss": {}}
    for variant, fields in LIT_CONFIGS.items():
        run = out / variant
        run.mkdir(parents=True)
        cfg = Config(**fields)
        train = {"save_interval": 2, "log_interval": 1, "global_batch_size": 4, "micro_batch_size": 4,
                 "max_tokens": 4 * 4 * seq_len, "max_seq_length": seq_len, "max_norm": 1.0, "lr_warmup_steps": 1,
                 "min_lr": 1e-3}
        evals = {"interval": 1000, "max_iters": 1, "initial_validation": False, "final_validation": False}
        optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-2}}
        launch = {"model_name": fields["name"], "model_config": fields, "out_dir": str(run), "precision": "32-true",
                  "devices": 1, "logger_name": "csv", "tokenizer_dir": str(tokenizer_dir), "train": train,
                  "eval": evals, "optimizer": optimizer, "seed": 42}
        (out / f"{variant}.yaml").write_text(yaml.safe_dump(launch))
        sys.argv = ["litgpt", "pretrain", "--config", str(out / f"{variant}.yaml")]
        setup(model_name=fields["name"], model_config=cfg, out_dir=run, precision="32-true",
              data=_lit_data_module(tokens_dir, seq_len), devices=1, tokenizer_dir=tokenizer_dir, logger_name="csv",
              train=TrainArgs(**train), eval=EvalArgs(**evals), optimizer=optimizer, seed=42)
        for step_dir in sorted(p for p in run.iterdir() if (p / "lit_model.pth").is_file()):
            model = GPT(Config.from_file(step_dir / "model_config.yaml"))
            model.load_state_dict(torch.load(step_dir / "lit_model.pth", weights_only=True)["model"])
            model.eval()
            with torch.no_grad():  # litgpt's own forward
                ref["loss"][f"{variant}/{step_dir.name}"] = mean_loss(model(inputs), targets)
        ref[f"{variant}_config"] = dataclasses.asdict(cfg)
    return ref


# ---------------------------------------------------------------------------------------------- OLMo-core


def olmo_core_model_config(variant: str):
    """OLMo-core's own config builders, tiny: OLMo 2 (reordered norms, QK-norm), OLMo 3 (+ a sliding-window
    layer), and a Llama-like pre-norm model with complex RoPE and tied embeddings. init_std 0.1 (not 0.02) so that
    attention is sharp enough for RoPE and QK-norm to matter in the loss."""
    from olmo_core.nn.attention import AttentionBackendName, SlidingWindowAttentionConfig
    from olmo_core.nn.rope import RoPEType
    from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig

    common = {"d_model": DIM, "vocab_size": VOCAB, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV_HEADS,
              "rope_theta": 10_000, "hidden_size_multiple_of": 32, "attn_backend": AttentionBackendName.torch,
              "init_std": 0.1}
    if variant == "olmo2":
        return TransformerConfig.llama_like(**common, block_name=TransformerBlockType.reordered_norm, qk_norm=True,
                                            layer_norm_eps=1e-6)
    if variant == "olmo3":
        window = SlidingWindowAttentionConfig(pattern=[16], force_full_attention_on_first_layer=False,
                                              force_full_attention_on_last_layer=True)
        return TransformerConfig.llama_like(**common, block_name=TransformerBlockType.reordered_norm, qk_norm=True,
                                            layer_norm_eps=1e-6, sliding_window=window)
    return TransformerConfig.llama_like(**common, rope_type=RoPEType.complex, tie_word_embeddings=True)


def write_olmo_core(out: Path, tokens_dir: Path, seq_len: int, tokenizer_dir: Path | None) -> dict:
    """OLMo-core's own Trainer on the token shards (its NumpyFSLDataset reads raw uint16 token files), one run per
    variant, with its CheckpointerCallback (step0, step2, step4: `stepN/model_and_optim` DCP + train/rank0.pt +
    .metadata.json) and ConfigSaverCallback (the run's config.json in each step dir), as OLMo-core's launch
    scripts attach them; gloo on CPU, the `torch` attention backend. Also OLMo-core's own HF export
    (`olmo_core.nn.hf.save_hf_model`, max_position_embeddings -1) of the olmo2 run's last weights.
    Reference: each step dir loaded into a fresh model by OLMo-core's own `load_model_and_optim_state`, and that
    model's forward (float32)."""
    from dataclasses import dataclass

    from olmo_core.config import Config
    from olmo_core.data import (
        NumpyDataLoaderConfig,
        NumpyDatasetDType,
        NumpyFSLDatasetConfig,
        TokenizerConfig,
    )
    from olmo_core.distributed.checkpoint import load_model_and_optim_state
    from olmo_core.nn.hf.checkpoint import save_hf_model
    from olmo_core.nn.transformer import TransformerConfig
    from olmo_core.optim import AdamWConfig
    from olmo_core.train import (
        Duration,
        TrainerConfig,
        prepare_training_environment,
        teardown_training_environment,
    )
    from olmo_core.train.callbacks import CheckpointerCallback, ConfigSaverCallback
    from olmo_core.train.train_module import TransformerTrainModuleConfig

    @dataclass
    class ExperimentConfig(Config):  # the shape of OLMo-core's own scripts' experiment config
        model: TransformerConfig
        dataset: NumpyFSLDatasetConfig
        data_loader: NumpyDataLoaderConfig
        train_module: TransformerTrainModuleConfig
        trainer: TrainerConfig
        init_seed: int = 0

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    prepare_training_environment(seed=0, backend="cpu:gloo")
    w = windows(tokens_dir, seq_len)
    inputs, targets = w[:, :-1], w[:, 1:]
    ref = {"windows": len(w), "loss": {}}
    for variant, steps in (("olmo2", 4), ("olmo3", 2), ("llama", 2)):
        run = out / variant
        model_cfg = olmo_core_model_config(variant)
        exp = ExperimentConfig(
            model=model_cfg,
            dataset=NumpyFSLDatasetConfig(paths=[str(p) for p in sorted(tokens_dir.glob("*.bin"))],
                                          sequence_length=seq_len, dtype=NumpyDatasetDType.uint16,
                                          tokenizer=TokenizerConfig(vocab_size=VOCAB, eos_token_id=0, pad_token_id=1),
                                          work_dir=str(out / "work" / variant)),
            data_loader=NumpyDataLoaderConfig(global_batch_size=4 * seq_len, seed=0, num_workers=0),
            train_module=TransformerTrainModuleConfig(rank_microbatch_size=4 * seq_len, max_sequence_length=seq_len,
                                                      optim=AdamWConfig(lr=1e-2)),
            trainer=TrainerConfig(save_folder=str(run), work_dir=str(out / "work" / variant), device="cpu",
                                  max_duration=Duration.steps(steps), callbacks={
                                      "checkpointer": CheckpointerCallback(save_interval=2, save_async=False),
                                      "config_saver": ConfigSaverCallback()}))
        model = exp.model.build(init_device="cpu")
        train_module = exp.train_module.build(model, device=torch.device("cpu"))
        data_loader = exp.data_loader.build(exp.dataset.build(), dp_process_group=train_module.dp_process_group)
        trainer = exp.trainer.build(train_module, data_loader)
        trainer.callbacks["config_saver"].config = exp.as_config_dict()
        trainer.fit()
        for step in sorted(p for p in run.iterdir() if p.name.startswith("step")):
            fresh = model_cfg.build(init_device="cpu")
            load_model_and_optim_state(step / "model_and_optim", fresh)
            fresh.eval()
            with torch.no_grad():  # OLMo-core's own forward
                ref["loss"][f"{variant}/{step.name}"] = mean_loss(fresh(inputs), targets)
        if variant == "olmo2":
            save_hf_model(out / "hf_export", fresh.state_dict(), fresh)
            ref["loss"]["hf_export"] = ref["loss"][f"olmo2/{step.name}"]
            if tokenizer_dir is not None:
                for f in Path(tokenizer_dir).iterdir():
                    (out / "hf_export" / f.name).write_bytes(f.read_bytes())
    teardown_training_environment()
    return ref
# ---------------------------------------------------------------------------------------------- Megatron-Core MoE
# Three router kinds, each mapped onto its own transformers class (see formats/megatron.py):
MEGATRON_MOE = {
    # Mixtral: softmax over the top-k logits (moe_router_pre_softmax=False), 4 experts, top-2, SequentialMLP
    "mixtral": {"moe_router_pre_softmax": False},
    # Qwen2-MoE: softmax over all experts before the top-k (no renormalisation) and a gated shared expert
    "qwen2_moe": {"moe_router_pre_softmax": True, "moe_shared_expert_intermediate_size": 80,
                      "moe_shared_expert_gate": True},
    # GLM-4-MoE: sigmoid scores, an aux-loss-free expert_bias that changes routing, renormalised top-k scaled by
    # 2.5, an ungated shared expert
    "glm4_moe": {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
                     "moe_router_topk_scaling_factor": 2.5, "moe_shared_expert_intermediate_size": 48},
}


def _megatron_moe_cpu_shims() -> None:
    """Without Transformer Engine, megatron-core's moe_utils never defines its TE helpers (`te_general_gemm`,
    `fused_*`), yet its router tests `te_general_gemm is not None`; set to None they take its own torch path."""
    from megatron.core.transformer.moe import moe_utils

    for name in ("te_general_gemm", "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
                 "fused_permute_with_probs", "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs",
                 "fused_topk_with_score_function", "fused_unpermute"):
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def write_megatron_moe(out: Path, tokens_dir: Path, seq_len: int) -> dict:
    """One Megatron run dir per router kind (MEGATRON_MOE): VARIANT/iter_0000010 written by
    `dist_checkpointing.save` from a `GPTModel` with 4 experts, top-2, SequentialMLP experts (the grouped ones
    need CUDA grouped_gemm), allgather dispatcher (alltoall builds a CUDA stream), with Megatron-LM's args in
    common.pt; references from Megatron's own forward (float32)."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    _init_process_group()
    parallel_state.initialize_model_parallel(1, 1)
    _megatron_cpu_shims()
    _megatron_moe_cpu_shims()
    w = windows(tokens_dir, seq_len)
    inputs, targets = w[:, :-1], w[:, 1:]
    positions = torch.arange(seq_len).repeat(len(w), 1)
    causal = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), 1)[None, None]
    refs = {}
    for seed, (variant, moe) in enumerate(MEGATRON_MOE.items()):
        torch.manual_seed(seed)
        args = megatron_args(tie=False)
        moe = {"num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 48, "moe_grouped_gemm": False,
               "moe_token_dispatcher_type": "allgather", "moe_aux_loss_coeff": 0.0, **moe}
        for k, v in moe.items():
            setattr(args, k, v)
        config_moe = {("num_moe_experts" if k == "num_experts" else k): v for k, v in moe.items()}
        cfg = TransformerConfig(
            num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups, ffn_hidden_size=args.ffn_hidden_size,
            kv_channels=args.kv_channels, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
            normalization="RMSNorm", layernorm_epsilon=args.norm_epsilon, add_bias_linear=False,
            use_cpu_initialization=True, params_dtype=torch.float32, bias_dropout_fusion=False,
            apply_rope_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
            gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0, **config_moe)
        model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(
                             num_experts=args.num_experts, moe_grouped_gemm=False, normalization="RMSNorm"),
                         vocab_size=VOCAB, max_sequence_length=args.max_position_embeddings,
                         position_embedding_type="rope", rotary_base=args.rotary_base,
                         share_embeddings_and_output_weights=False)
        _perturb_norms(model, 10 + seed)
        g = torch.Generator().manual_seed(20 + seed)
        with torch.no_grad():  # routers sharpened, experts and head scaled: tokens spread, experts matter
            for name, p in model.named_parameters():
                if name.endswith("router.weight"):
                    p.mul_(20.0)
                elif "experts" in name or name.startswith("output_layer") or "linear_qkv" in name:
                    p.mul_(6.0)
            for name, b in model.named_buffers():
                if name.endswith("router.expert_bias"):
                    b.copy_(0.3 * torch.randn(b.shape, generator=g))
        run = out / variant
        ckpt = run / "iter_0000010"
        ckpt.mkdir(parents=True)
        dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 10, "checkpoint_version": 3.0,
                                 "args": args}, str(ckpt))
        (run / "latest_checkpointed_iteration.txt").write_text("10")
        model.eval()
        ref: dict = {}
        with torch.no_grad():  # Megatron's own forward
            ref["loss"] = mean_loss(model(inputs, positions, causal), targets)
            chosen: set = set()
            hook = model.decoder.layers[-1].mlp.router.register_forward_hook(
                lambda _m, _i, o, chosen=chosen: chosen.update(o[1].nonzero()[:, 1].tolist()))
            model(inputs[:2], positions[:2], causal)
            hook.remove()
            ref["experts_chosen"] = sorted(chosen)
            if variant == "glm4_moe":
                for layer in model.decoder.layers:
                    layer.mlp.router.expert_bias.zero_()
                ref["loss_without_expert_bias"] = mean_loss(model(inputs, positions, causal), targets)
        (run / "reference.json").write_text(json.dumps(ref))
        refs[variant] = ref
    return refs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("family", choices=["titan", "titan-moe", "megatron", "megatron-moe", "litgpt", "olmo_core"])
    ap.add_argument("out", type=Path)
    ap.add_argument("tokens", type=Path)
    ap.add_argument("seq_len", type=int)
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--no-job-config", action="store_true")
    ap.add_argument("--no-args", action="store_true")
    ap.add_argument("--tokenizer", type=Path)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.family == "titan":
        ref = write_titan(a.out, a.tokens, a.seq_len, a.tie, not a.no_job_config)
    elif a.family == "litgpt":
        ref = write_litgpt(a.out, a.tokens, a.seq_len, a.tokenizer)
    elif a.family == "olmo_core":
        ref = write_olmo_core(a.out, a.tokens, a.seq_len, a.tokenizer)
    elif a.family == "titan-moe":  # one process (and one torchtitan import) for both MoE models
        ref = {"qwen3": write_titan_moe(a.out / "qwen3", a.tokens, a.seq_len),
               "deepseek": write_titan_deepseek(a.out / "deepseek", a.tokens, a.seq_len)}
    elif a.family == "megatron-moe":
        ref = write_megatron_moe(a.out, a.tokens, a.seq_len)
    else:
        ref = write_megatron(a.out, a.tokens, a.seq_len, a.tie, not a.no_args)
    (a.out / "reference.json").write_text(json.dumps(ref))
    print(json.dumps(ref))


def run(family: str, out: Path, tokens: Path, seq_len: int, *flags: str, timeout: int = 300) -> dict:
    """Run this script in a subprocess (the caller's interpreter); returns reference.json."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, family, str(out), str(tokens), str(seq_len), *flags],
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "reference.json").read_text())


if __name__ == "__main__":
    main()


def torchrun(nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run --nproc_per_node=N` on a free port (as tests/test_parallel.py does)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]


def stock_harness(hf_dir, limit: int, tokenizer=None) -> dict[str, float]:
    """lm-eval alone: `simple_evaluate` with a plain HFLM on an HF dir, or on a model object with its tokenizer
    (the offline tasks in ckpteval/tasks)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ckpteval.tasks import TASKS_DIR as tasks_dir

    if isinstance(hf_dir, (str, Path)):
        lm = HFLM(pretrained=str(hf_dir), batch_size=8, device="cpu", dtype="float32")
    else:
        lm = HFLM(pretrained=hf_dir, tokenizer=tokenizer, batch_size=8)
    ref = simple_evaluate(model=lm, tasks=["ckpteval_mc", "ckpteval_rolling"], limit=limit, log_samples=False,
                          task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                          random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    return {f"harness/{task}/{key.split(',')[0]}": value for task in ("ckpteval_mc", "ckpteval_rolling")
            for key, value in ref["results"][task].items() if "," in key and isinstance(value, float)}


def harness_vs_stock(ckpt: Path, tmp: Path, limit: int = 6) -> tuple[dict, dict, Path]:
    """mode=harness (fast backend) on `ckpt`, and stock lm-eval on its mode=convert output: (ours, stock, hf dir)."""
    from ckpteval import app
    from tests import factories

    from ckpteval.tasks import TASKS_DIR as tasks_dir
    converted = app.main(factories.compose(["mode=convert", f"ckpt={ckpt}", f"convert.out={tmp / 'hf'}",
                                            f"tracking.uri=sqlite:///{tmp}/m.db"]))
    ours = app.main(factories.compose([
        "mode=harness", f"ckpt={ckpt}", "harness=offline", f"harness.include_path={tasks_dir}", "harness.backend=fast",
        "harness.batch_size=8", "harness.seed=1234", f"harness.limit={limit}", f"tracking.uri=sqlite:///{tmp}/m.db"]))
    hf_dir = Path(converted["convert/out"])
    return ours, stock_harness(hf_dir, limit), hf_dir


def harness_vs_hflm(ckpt: Path, tmp: Path, limit: int = 6) -> tuple[dict, dict]:
    """mode=harness (fast backend) on `ckpt`, and stock lm-eval's HFLM given the model and tokenizer our loader
    returns for it (for checkpoints mode=convert refuses): (ours, stock)."""
    from ckpteval import app
    from ckpteval.checkpoint import inspect_checkpoint, load_model, load_tokenizer
    from tests import factories

    from ckpteval.tasks import TASKS_DIR as tasks_dir
    ours = app.main(factories.compose([
        "mode=harness", f"ckpt={ckpt}", "harness=offline", f"harness.include_path={tasks_dir}", "harness.backend=fast",
        "harness.batch_size=8", "harness.seed=1234", f"harness.limit={limit}", f"tracking.uri=sqlite:///{tmp}/m.db"]))
    info = inspect_checkpoint(ckpt)
    return ours, stock_harness(load_model(info), limit, tokenizer=load_tokenizer(info, required=True))


# ---------------------------------------------------------------------------------------------- the app on them
# The same end-to-end checks for every framework's checkpoints (tests/test_formats_{titan,megatron}.py).
def _eval_args(shards: Path, seq: int, batch: int = 8) -> list[str]:
    return ["data=local", f"data.dataset_path={shards}", f"eval.seq_len={seq}", f"eval.batch_size={batch}",
            "eval.steps=-1"]


def watch_once_losses(watch_dir: Path, shards: Path, seq: int, db: Path) -> tuple[dict, dict[str, float]]:
    """`mode=watch watch.once=true` on `watch_dir`: (summary, eval/loss per checkpoint dir name)."""
    from ckpteval import app
    from tests import factories

    summary = app.main(factories.compose(["mode=watch", f"watch.dir={watch_dir}", "watch.once=true",
                                          "watch.stable_s=0", *_eval_args(shards, seq), f"tracking.uri=sqlite:///{db}"]))
    _, runs = factories.mlflow_runs(db)
    losses = {Path(r.data.tags["ckpt"]).name: r.data.metrics["eval/loss"] for r in runs
              if "eval/loss" in r.data.metrics and r.data.tags.get("evaluation") != "watcher"}  # not the summary run
    return summary, losses


def glob_scan_points(cwd: Path, pattern: str, shards: Path, seq: int, jobs: int,
                     key=lambda ckpt: Path(ckpt).name) -> dict[str, tuple[int, float]]:
    """`python run.py -m mode=loss ckpt=glob:PATTERN` in `cwd`: (step, eval/loss) per child run's checkpoint, keyed
    by `key(ckpt path)` (its name by default)."""
    from tests import factories

    db = cwd / "mlflow.db"
    proc = factories.run_cli(["-m", "mode=loss", f"ckpt=glob:{pattern}", *_eval_args(shards, seq),
                              f"tracking.uri=sqlite:///{db}", "hydra.sweep.dir=sweep"], cwd=cwd, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert f"sweep summary: {jobs} job(s), {jobs} completed" in proc.stdout
    client, runs = factories.mlflow_runs(db)
    points = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId"):
            [point] = client.get_metric_history(r.info.run_id, "eval/loss")
            points[key(r.data.tags["ckpt"])] = (point.step, point.value)
    return points


def torchrun_loss(ckpt: Path, layout: str, shards: Path, seq: int, cwd: Path) -> float:
    """`mode=loss parallel=LAYOUT` under torchrun with 2 processes: the printed eval/loss."""
    from tests import factories

    proc = factories.run_cli(["mode=loss", f"ckpt={ckpt}", *_eval_args(shards, seq, batch=4), "tracking.enabled=false",
                              f"parallel={layout}"], cwd=cwd, timeout=500, launcher=torchrun(2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return factories.last_json_line(proc.stdout)["eval/loss"]


def assert_harness_equals_stock(run: Path, ckpt_rel: str, tmp: Path, tokenizer_dir: Path, files: list, seq: int,
                                ref_loss: float, step: int) -> None:
    """mode=harness (fast backend) on a copy of `run` with the tokenizer beside it (as a trainer's assets would be)
    = stock lm-eval (HFLM) on its mode=convert output, whose loss is the framework's own."""
    import shutil

    import pytest
    from transformers import AutoModelForCausalLM

    from tests import factories

    root = tmp / "run"
    shutil.copytree(run, root)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, root / f.name)
    ours, stock, hf_dir = harness_vs_stock(root / ckpt_rel, tmp)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert abs(factories.reference_loss(model, files, seq) - ref_loss) < 1e-5
    assert stock and ours["step"] == step
    for key, value in stock.items():
        assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-5), key  # perplexities of a random model are ~1e7

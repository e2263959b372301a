"""Checkpoints written by the trainers' OWN code, and their OWN forward's loss as the reference.

Run in a subprocess (each framework wants a process group, and Megatron's saver spawns helper processes):

    python tests/framework_ckpts.py titan OUT TOKENS_DIR SEQ_LEN [--tie] [--no-job-config]
    python tests/framework_ckpts.py megatron OUT TOKENS_DIR SEQ_LEN [--tie] [--no-args]

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("family", choices=["titan", "megatron"])
    ap.add_argument("out", type=Path)
    ap.add_argument("tokens", type=Path)
    ap.add_argument("seq_len", type=int)
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--no-job-config", action="store_true")
    ap.add_argument("--no-args", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.family == "titan":
        ref = write_titan(a.out, a.tokens, a.seq_len, a.tie, not a.no_job_config)
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


def stock_harness(hf_dir: Path, limit: int) -> dict[str, float]:
    """lm-eval alone: `simple_evaluate` with a plain HFLM on an HF dir (the offline tasks in ckpteval/tasks)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ckpteval.tasks import TASKS_DIR as tasks_dir
    lm = HFLM(pretrained=str(hf_dir), batch_size=8, device="cpu", dtype="float32")
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


def glob_scan_points(cwd: Path, pattern: str, shards: Path, seq: int, jobs: int) -> dict[str, tuple[int, float]]:
    """`python run.py -m mode=loss ckpt=glob:PATTERN` in `cwd`: (step, eval/loss) per child run's checkpoint name."""
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
            points[Path(r.data.tags["ckpt"]).name] = (point.step, point.value)
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

"""FSDP-sharded and DeepSpeed ZeRO checkpoints written by the HF Trainer itself, and the trained model's OWN forward
loss at every save as the reference. Run under torchrun (2 processes, gloo on CPU):

    DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 tests/sharded_ckpts.py deepspeed OUT TOKENS_DIR TOKENIZER_DIR SEQ_LEN
    torchrun --nproc_per_node=2 tests/sharded_ckpts.py fsdp OUT TOKENS_DIR TOKENIZER_DIR SEQ_LEN
    python tests/sharded_ckpts.py zero_to_fp32 OUT DEST       # DeepSpeed's own converter: HF dirs DEST/zero{1,2,3}
    python tests/sharded_ckpts.py merge_fsdp FSDP_DIR DEST    # accelerate's own merge: DEST/model.safetensors

Each trains a tiny Llama (tests/factories.py's) for 4 optimizer steps with `save_steps=2` into the Trainer's output
dir (checkpoint-2, checkpoint-4): OUT for FSDP, OUT/zero{0,1,2,3} for DeepSpeed (stage 0 = no ZeRO partitions, the
weights only in the model states; ZeRO-2 with tied embeddings; ZeRO-3 also saved bare by
`engine.save_checkpoint(OUT/zero3/bare)`), and writes `reference.json` beside them:
{"checkpoint-N": loss}, where loss is the
token-weighted mean next-token loss of the model *as the framework holds it at that save* (the DeepSpeed engine /
FSDP2 module forward on every rank; ZeRO-3 and FSDP gather their shards themselves) over every window of the token
files, float32 -- the same contract as `factories.reference_loss`.

What the frameworks need on a CPU machine (seen with transformers 5.24, accelerate 1.16, deepspeed 0.19):
- DeepSpeed: `DS_ACCELERATOR=cpu` (gloo); a DeepSpeed config with concrete batch sizes (`"auto"` makes the Trainer
  all-gather a CPU tensor over gloo), the Trainer not counting input tokens, and a torch optimizer (DeepSpeed's
  CPUAdam is a C++ op it would compile): `zero_allow_untested_optimizer` + `zero_force_ds_cpu_optimizer: false`.
  DeepSpeed's C++ ops are declared unavailable (see `_no_deepspeed_cpp_ops`).
- FSDP: accelerate never enables FSDP for a CPU launch (the Trainer silently trains DDP and writes
  model.safetensors), so the Trainer subclass below sets the FSDP2 plugin (built from the Trainer's own fsdp_config)
  on accelerate's state right after creating its Accelerator, as a GPU launch would have (FSDP1 fails on CPU:
  "Inconsistent compute device and device_id").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.framework_ckpts import mean_loss, windows

STEPS, SAVE_EVERY, BATCH = 4, 2, 2


MODEL_FIELDS: dict = {}  # --model-json: LlamaConfig fields over factories' tiny one (benchmarks/bench_zero_memory.py)


def _model(seed: int = 0, tie: bool = False):
    from transformers import LlamaForCausalLM

    from tests import factories

    if not MODEL_FIELDS:
        return factories.make_model(seed=seed, tie=tie).train()
    torch.manual_seed(seed)
    config = factories.llama_config(tie=tie)
    config.update(MODEL_FIELDS)
    return LlamaForCausalLM(config).train()


class _TokenWindows(torch.utils.data.Dataset):
    def __init__(self, w: torch.Tensor):
        self.w = w

    def __len__(self) -> int:
        return len(self.w)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.w[i], "labels": self.w[i]}


def _reference_callback(out: Path, w: torch.Tensor, forward):
    """At every save, the loss of the model as the framework holds it then (every rank runs the forward: ZeRO-3
    and FSDP gather their shards collectively); rank 0 records it under the checkpoint's name."""
    from transformers import TrainerCallback

    class Reference(TrainerCallback):
        def __init__(self):
            self.losses: dict[str, float] = {}

        def on_save(self, args, state, control, **kwargs):
            inputs, targets = w[:, :-1], w[:, 1:]
            with torch.no_grad():
                logits = torch.cat([forward(inputs[i:i + 8]) for i in range(0, len(inputs), 8)])
            self.losses[f"checkpoint-{state.global_step}"] = mean_loss(logits.float(), targets)
            if int(os.environ.get("RANK", "0")) == 0:
                (out / "reference.json").write_text(json.dumps(self.losses))

    return Reference()


def _args(out: Path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), max_steps=STEPS, save_steps=SAVE_EVERY, per_device_train_batch_size=BATCH,
        learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True, **kw)


def _no_deepspeed_cpp_ops() -> None:
    """DeepSpeed probes every C++ op with the compiler and JIT-builds a shared-memory all-reduce kernel for CPU runs
    (~90 s of g++ on a 2-core machine, once per machine). Declared unavailable, DeepSpeed reduces through
    torch.distributed (gloo) instead; what it saves is the same."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}


def write_deepspeed(out: Path, tokens: Path, tokenizer_dir: Path, seq_len: int, stage: int) -> None:
    from accelerate.state import AcceleratorState
    from transformers import AutoTokenizer, Trainer

    _no_deepspeed_cpp_ops()
    AcceleratorState._reset_state()  # a fresh DeepSpeed plugin per stage in this one process

    ds_config = {
        "train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
        "train_batch_size": BATCH * int(os.environ.get("WORLD_SIZE", "1")),
        "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False, "fp16": {"enabled": False}, "bf16": {"enabled": False},
        "gradient_clipping": 1.0, "steps_per_print": 1000,
    }
    w = windows(tokens, seq_len)
    trainer = Trainer(model=_model(seed=stage, tie=stage == 2), args=_args(out, deepspeed=ds_config),
                      train_dataset=_TokenWindows(w), processing_class=AutoTokenizer.from_pretrained(tokenizer_dir))

    def forward(x):
        trainer.model_wrapped.eval()  # the DeepSpeed engine: its own forward (ZeRO-3 gathers the partitions)
        return trainer.model_wrapped(input_ids=x).logits

    trainer.add_callback(_reference_callback(out, w, forward))
    trainer.train()
    if stage == 3:  # a bare DeepSpeed save dir too (engine.save_checkpoint: DIR/latest + DIR/global_step4/)
        trainer.model_wrapped.save_checkpoint(str(out / "bare"))


def write_fsdp(out: Path, tokens: Path, tokenizer_dir: Path, seq_len: int) -> None:
    """The Trainer with FSDP2 (`fsdp_config.fsdp_version=2`, SHARDED_STATE_DICT): checkpoint-N/pytorch_model_fsdp_0
    and optimizer_0 (accelerate's save_fsdp_model / save_fsdp_optimizer, as on GPUs); then the run's config.json
    and tokenizer in the output dir."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import AutoTokenizer, Trainer

    class CPUFSDPTrainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state  # accelerate enables FSDP only for GPU-like launches: do what it would
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    w = windows(tokens, seq_len)
    args = _args(out, fsdp="full_shard auto_wrap", fsdp_config={
        "fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True,
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "cpu_ram_efficient_loading": False})
    trainer = CPUFSDPTrainer(model=_model(seed=4), args=args, train_dataset=_TokenWindows(w),
                             processing_class=AutoTokenizer.from_pretrained(tokenizer_dir))
    assert trainer.is_fsdp_enabled

    def forward(x):
        trainer.model.eval()  # the FSDP2 module: its own forward (all-gathers each layer's shards)
        return trainer.model(input_ids=x).logits

    trainer.add_callback(_reference_callback(out, w, forward))
    trainer.train()
    if trainer.is_world_process_zero():  # where the run keeps its architecture: the output dir's config.json
        # (what save_model after set_state_dict_type("FULL_STATE_DICT") writes besides the weights; that gather
        # fails on CPU inside safetensors: "Attempted to access the data pointer on an invalid python storage")
        trainer.model.config.save_pretrained(out)
        trainer.processing_class.save_pretrained(out)


# ---------------------------------------------------------------------------------------------- the frameworks' own
# converters, as references (plain torch.load / pickle inside: only ever run here, in a subprocess of a test)


def zero_to_fp32(root: Path, dest: Path) -> None:
    """DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` (what zero_to_fp32.py runs) on every
    root/zero{1,2,3}/checkpoint-4 -> the HF dir dest/zero{S} (one process: DeepSpeed imports once)."""
    import shutil

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    for save_dir in sorted(root.glob("zero[123]/checkpoint-4")):  # stage 0 has no partitions to convert
        state = get_fp32_state_dict_from_zero_checkpoint(str(save_dir))
        first: dict[int, str] = {}  # a shared (tied) tensor is saved once, under its first name
        kept = {k: v for k, v in state.items() if first.setdefault(id(v), k) == k}
        out = dest / save_dir.parent.name
        out.mkdir(parents=True)
        save_file({k: v.contiguous().clone() for k, v in kept.items()}, str(out / "model.safetensors"))
        shutil.copy(save_dir / "config.json", out / "config.json")  # an HF dir stock transformers loads


def merge_fsdp(fsdp_dir: Path, dest: Path) -> None:
    """accelerate's own `merge_fsdp_weights` (what `accelerate merge-weights` runs) -> dest/model.safetensors."""
    from accelerate.utils import merge_fsdp_weights

    merge_fsdp_weights(str(fsdp_dir), str(dest), safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("family", choices=["deepspeed", "fsdp", "zero_to_fp32", "merge_fsdp"])
    ap.add_argument("out", type=Path)
    ap.add_argument("args", nargs="*")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--model-json", default="")
    a = ap.parse_args()
    MODEL_FIELDS.update(json.loads(a.model_json or "{}"))
    if a.family == "zero_to_fp32":
        return zero_to_fp32(a.out, Path(a.args[0]))
    if a.family == "merge_fsdp":
        return merge_fsdp(a.out, Path(a.args[0]))
    tokens, tokenizer, seq_len = Path(a.args[0]), Path(a.args[1]), int(a.args[2])
    a.out.mkdir(parents=True, exist_ok=True)
    if a.family == "deepspeed":
        for stage in map(int, a.stages.split(",")):  # one process for all stages: DeepSpeed starts once
            write_deepspeed(a.out / f"zero{stage}", tokens, tokenizer, seq_len, stage)
    else:
        write_fsdp(a.out, tokens, tokenizer, seq_len)
    _finish()


def _finish() -> None:
    """Every rank done writing, then the process group closed before the interpreter exits: left to interpreter
    teardown, a rank sometimes aborts there ("terminate called without an active exception", SIGABRT) after
    everything was written."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu",
            "TOKENIZERS_PARALLELISM": "false"}


def write(family: str, out: Path, tokens: Path, tokenizer: Path, seq_len: int, *flags: str, timeout: int = 500) -> dict:
    """Train and save under torchrun (2 processes) in a subprocess; returns the reference losses: {checkpoint
    name: loss} for fsdp, {"zero1": {...}, "zero2": ..., "zero3": ...} for deepspeed."""
    import subprocess

    from tests.framework_ckpts import torchrun

    proc = subprocess.run([*torchrun(2), __file__, family, str(out), str(tokens), str(tokenizer), str(seq_len), *flags],
                          env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    if family == "fsdp":
        return json.loads((out / "reference.json").read_text())
    return {d.name: json.loads((d / "reference.json").read_text()) for d in sorted(out.glob("zero*"))}


def convert(kind: str, src: Path, dest: Path, timeout: int = 300) -> Path:
    """`zero_to_fp32` / `merge_fsdp` above in a subprocess; returns `dest`."""
    import subprocess

    proc = subprocess.run([sys.executable, __file__, kind, str(src), str(dest)], env=_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return dest


if __name__ == "__main__":
    main()

"""Peak memory of reading a DeepSpeed ZeRO checkpoint: ours (fp32 weights from the memory-mapped optimizer
partitions) against DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`, and against the sizes involved.

    python benchmarks/bench_zero_memory.py                      # writes a ~59M-param Llama with ZeRO-2 and ZeRO-3
    python benchmarks/bench_zero_memory.py --out /tmp/zero_bench --stages 3 --hidden 768 --layers 12

The checkpoints are written by the HF Trainer + DeepSpeed under torchrun (2 ranks, CPU, gloo; tests/sharded_ckpts.py)
once into --out. Each measurement runs in a fresh process and reports the peak RSS above that process's baseline
(VmHWM, reset through /proc/self/clear_refs, after the imports): `read_state` is our reconstruction alone,
`load_model` the whole load (the model plus the state it is filled from), `zero_to_fp32` DeepSpeed's own (plain
torch.load, so only ever run here). Mapped file pages count in RSS while mapped: ours maps one rank's optimizer file
at a time, so it peaks at one fp32 copy of the model plus one rank's partition, never the optimizer's moments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, sys
sys.path[:0] = [{repo!r}, {src!r}, {bench!r}]
from _measure import peak_since, reset_peak
what, tag = sys.argv[1], sys.argv[2]
if what == "zero_to_fp32":
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    import os
    base = reset_peak("cpu")
    state = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag), tag=os.path.basename(tag))
else:
    from ckpteval.checkpoint import inspect_checkpoint, load_model
    from ckpteval.checkpoint.load import build_config
    info = inspect_checkpoint(tag)
    build_config(info)  # imports transformers' model code (~200 MB of RSS that is not the checkpoint's)
    base = reset_peak("cpu")
    state = info.family.read_state(info.path, None) if what == "read_state" else load_model(info)
print(json.dumps({{"peak": peak_since("cpu", base)}}))
"""


def measure(what: str, tag: Path) -> int:
    code = MEASURE.format(repo=str(REPO), src=str(REPO / "src"), bench=str(REPO / "benchmarks"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", code, what, str(tag)], env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{what} on {tag} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak"]


def write(out: Path, stages: str, fields: dict) -> None:
    sys.path[:0] = [str(REPO), str(REPO / "src")]
    from tests import factories, sharded_ckpts

    tokens = factories.make_token_shards(out / "tokens")
    tokenizer = factories.make_tokenizer(out / "tokenizer")
    sharded_ckpts.write("deepspeed", out / "ds", tokens, tokenizer, 64, "--stages", stages, "--model-json",
                        json.dumps(fields), timeout=3600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/ckpteval_zero_bench"))
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    fields = {"vocab_size": a.vocab, "hidden_size": a.hidden, "intermediate_size": a.hidden * 11 // 4,
              "num_hidden_layers": a.layers, "num_attention_heads": 8, "num_key_value_heads": 4}
    if not (a.out / "ds").is_dir():
        write(a.out, a.stages, fields)
    mb = 1 << 20
    print(f"{'stage':>5} {'fp32 model':>11} {'optim files':>12} {'read_state':>11} {'load_model':>11} "
          f"{'zero_to_fp32':>13}   (MiB; peak RSS above each process's baseline)")
    for stage in map(int, a.stages.split(",")):
        tag = a.out / "ds" / f"zero{stage}" / "checkpoint-4" / "global_step4"
        optim = sum(f.stat().st_size for f in tag.glob("*_optim_states.pt"))
        shapes = json.loads((tag.parent / "config.json").read_text())
        model_bytes = _param_bytes(shapes)
        peaks = [measure(what, tag) for what in ("read_state", "load_model", "zero_to_fp32")]
        print(f"{stage:>5} {model_bytes / mb:>11.0f} {optim / mb:>12.0f} " + " ".join(
            f"{p / mb:>{w}.0f}" for p, w in zip(peaks, (11, 11, 13))))


def _param_bytes(config: dict) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return sum(p.numel() * 4 for p in model.parameters())


if __name__ == "__main__":
    main()

"""Builders for tiny, offline test artefacts. Importable from any test (``from tests import factories``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

VOCAB = 512
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A checkpoint is a snapshot of the weights of a model during training.",
    "Perplexity is the exponential of the average negative log likelihood per token.",
    "def add(a, b):\n    return a + b\n",
    "Language models predict the next token given the previous tokens.",
    "Evaluation on held-out data tells us whether the model generalizes.",
] * 20


def make_tokenizer(out: Path, vocab_size: int = VOCAB) -> Path:
    """Train a byte-level BPE on TEXT and save it as an HF tokenizer dir (AutoTokenizer can load it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def llama_config(vocab_size: int = VOCAB, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                 max_pos: int = 256, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2 + 16, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def make_model(seed: int = 0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**kw))
    # Random init gives near-uniform predictions; scale the head so losses differ clearly between models.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def make_hf_checkpoint(out: Path, tokenizer_dir: Path | None = None, seed: int = 0, **kw) -> Path:
    """Save a random tiny Llama as an HF dir (safetensors) with the tokenizer copied in."""
    from transformers import AutoTokenizer

    out = Path(out)
    model = make_model(seed=seed, **kw)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def make_token_shards(out: Path, lengths=(1000, 777), vocab: int = VOCAB, seed: int = 0, dtype=np.uint16) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, n in enumerate(lengths):
        rng.integers(0, vocab, size=n).astype(dtype).tofile(out / f"shard_{i:03d}.bin")
    return out


def reference_loss(model, token_files: list[np.ndarray], seq_len: int, window_ids=None) -> float:
    """Independent reference: plain ``model(input_ids, labels=...)`` per window, token-weighted.

    Windows follow the contract: window k of a file covers tokens [k*L, k*L+L]; tails shorter than L+1 are
    dropped; files in the given order. ``window_ids`` selects (with repetition) which global windows count.
    """
    windows = []
    for arr in token_files:
        n = (len(arr) - 1) // seq_len
        windows += [np.asarray(arr[k * seq_len: k * seq_len + seq_len + 1], dtype=np.int64) for k in range(n)]
    ids = range(len(windows)) if window_ids is None else window_ids
    total, count = 0.0, 0
    with torch.no_grad():
        for i in ids:
            w = torch.from_numpy(windows[i]).unsqueeze(0)
            # HF shifts labels internally: labels = the window itself, loss over the L next-token targets.
            out = model(input_ids=w, labels=w)
            total += out.loss.double().item() * seq_len
            count += seq_len
    return total / count


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2))


REPO = Path(__file__).resolve().parents[1]


def shard_arrays(shards: Path) -> list[np.ndarray]:
    """The uint16 token shards of a `data=local` dir, in file order (what `reference_loss` takes)."""
    return [np.fromfile(f, dtype=np.uint16) for f in sorted(Path(shards).glob("*.bin"))]


def family_loss(path: Path, shards: Path, model_cfg=None, *, seq_len: int) -> tuple[float, str]:
    """(reference loss, architecture source) of a trainer's checkpoint as its format family reads it: the state dict
    loaded into a plain transformers model of the family's architecture, scored by `reference_loss`."""
    from transformers import AutoModelForCausalLM

    from ckpteval.checkpoint.formats import detect_format

    fmt = detect_format(path)
    path = fmt.resolve(path)
    arch = fmt.architecture(path, model_cfg)
    model = AutoModelForCausalLM.from_config(arch.config)
    model.load_state_dict(fmt.read_state(path, arch.config), strict=not arch.config.tie_word_embeddings)
    model.tie_weights()
    return reference_loss(model.eval(), shard_arrays(shards), seq_len), arch.source


def loss_cfg(tmp: Path, ckpt: Path, shards: Path, *extra: str, seq_len: int):
    """`mode=loss` on `ckpt` over every window of a `data=local` dir, batch 8, tracked in tmp's sqlite store."""
    return compose(["mode=loss", f"ckpt={ckpt}", "data=local", f"data.dataset_path={shards}",
                    f"eval.seq_len={seq_len}", "eval.batch_size=8", "eval.steps=-1",
                    f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra])


def compose(overrides: list[str]):
    """The config `python run.py OVERRIDES` would get (schema registered, conf/ composed)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ckpteval.config import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return hydra_compose(config_name="config", overrides=overrides)


def run_cli(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None, launcher: list[str] | None = None):
    """`python run.py ARGS` in a subprocess (the real CLI contract: stdout, stderr, exit code)."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = (launcher or [sys.executable]) + [str(REPO / "run.py")] + args
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def last_json_line(stdout: str) -> dict:
    """The result JSON line a job prints last on stdout."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in stdout:\n{stdout[-2000:]}")


def mlflow_runs(db: Path, experiment: str | None = None):
    """Runs of one experiment, or of every experiment of the store (each training run has its own)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exps = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    ids = [e.experiment_id for e in exps if e is not None]
    return client, client.search_runs(ids, max_results=1000) if ids else []


def write_llama_gguf(model, path: Path) -> Path:
    """A Llama in an F32 .gguf file written with the gguf package, as llama.cpp's converter lays it out (q/k rows
    permuted for its rotary layout, which transformers' GGUF loader undoes)."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    def permute(t, n_head):
        return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf]
        if gg.endswith("attn_q.weight"):
            t = permute(t, cfg.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            t = permute(t, cfg.num_key_value_heads)
        w.add_tensor(gg, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def require(module: str, extra: str):
    """Import a trainer framework a test writes checkpoints with. Outside CI a missing one skips with the install
    hint; under CI (CI=true, where .ci/run installs every extra) it is a failure, so nothing is skipped there."""
    import importlib
    import os

    import pytest

    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"needs the {extra} extra: pip install 'ckpteval[{extra}]' "
                                              "(CI installs it)")


def without_timings(result: dict | None) -> dict | None:
    """A job's result without what it says about its own time (`time/startup_seconds`, `*runtime_s`,
    `*overhead_s`): numbers every rank, rerun or resumed job must give identically."""
    if result is None:
        return None
    return {k: v for k, v in result.items()
            if not k.startswith("time/") and not k.endswith(("runtime_s", "overhead_s"))}


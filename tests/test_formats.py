"""Checkpoints written by the trainers people use, evaluated through the checkpoint-format layer.

Each family's checkpoints are written by the framework's OWN code where it installs on CPU:
- HF `Trainer` (transformers): real `checkpoint-N` dirs of a tiny Llama, a few optimizer steps.
- PyTorch Lightning `ModelCheckpoint`: real `epoch=0-step=N.ckpt` files of a LightningModule holding the Llama as
  `self.model`, the transformers config in its hyper_parameters (no config.json beside it).
- nanoGPT is not on PyPI: its `ckpt.pt` is written with its documented conventions (train.py's checkpoint dict:
  model, optimizer, model_args, iter_num, best_val_loss, config), from a minimal nanoGPT-architecture GPT written
  here (`NanoGPT`: its LayerNorm with optional bias, fused c_attn Linear, exact GELU, tied lm_head). That module is
  also the reference forward, independent of our GPT2LMHeadModel mapping.

The reference loss is always the framework's own model forward on the same windows (float32, 1e-5).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckpteval import app
from ckpteval.checkpoint import check_complete, inspect_checkpoint, load_model, parse_step
from ckpteval.checkpoint.formats import REGISTRY, detect_format
from ckpteval.errors import CkptEvalError
from tests import factories

SEQ = 32
from ckpteval.tasks import TASKS_DIR  # noqa: E402 - the offline lm-eval tasks (package data)


# ---------------------------------------------------------------------------------------------- references


def _windows(shards: Path) -> list[torch.Tensor]:
    """The loss contract's windows: window k of a file covers tokens [k*L, k*L+L], files in path order."""
    out = []
    for f in sorted(Path(shards).glob("*.bin")):
        arr = np.fromfile(f, dtype=np.uint16).astype(np.int64)
        out += [torch.from_numpy(arr[k * SEQ: k * SEQ + SEQ + 1]) for k in range((len(arr) - 1) // SEQ)]
    return out


@torch.no_grad()
def reference_loss(logits_fn, shards: Path) -> float:
    """Token-weighted mean next-token cross entropy of `logits_fn(input_ids) -> logits` over every window."""
    total, count = 0.0, 0
    for w in _windows(shards):
        logits = logits_fn(w[:-1].unsqueeze(0))[0].double()
        total += F.cross_entropy(logits, w[1:], reduction="sum").item()
        count += SEQ
    return total / count


# ---------------------------------------------------------------------------------------------- nanoGPT


class _LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: the bias is optional (PyTorch's had no bias=False when nanoGPT was written)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class _Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class _MLP(nn.Module):
    def __init__(self, n_embd: int, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class _Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.ln_1, self.attn = _LayerNorm(n_embd, bias), _Attention(n_embd, n_head, bias)
        self.ln_2, self.mlp = _LayerNorm(n_embd, bias), _MLP(n_embd, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's `GPT` (model.py), minimal: same module names, Linear layouts, GELU and weight tying."""

    def __init__(self, n_layer=2, n_head=4, n_embd=64, block_size=64, bias=True, vocab_size=factories.VOCAB,
                 dropout=0.0):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd), drop=nn.Dropout(dropout),
            h=nn.ModuleList([_Block(n_embd, n_head, bias) for _ in range(n_layer)]), ln_f=_LayerNorm(n_embd, bias)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx):
        pos = torch.arange(idx.size(1))
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def write_nanogpt(out_dir: Path, bias: bool, iter_num: int, compiled: bool, seed: int = 0) -> NanoGPT:
    """Train a NanoGPT a few steps and save `out_dir/ckpt.pt` the way nanoGPT's train.py does."""
    torch.manual_seed(seed)
    model_args = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=bias, vocab_size=factories.VOCAB,
                      dropout=0.0)
    model = NanoGPT(**model_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randint(0, factories.VOCAB, (4, 33))
    for _ in range(3):
        logits = model(data[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), data[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = model.state_dict()
    if compiled:  # torch.compile wraps the module: train.py saves raw_model.state_dict() with this prefix then
        state = {"_orig_mod." + k: v for k, v in state.items()}
    config = {"out_dir": str(out_dir), "batch_size": 12, "block_size": 64, "gradient_accumulation_steps": 5,
              "learning_rate": 1e-2, "compile": compiled, "dataset": "shakespeare_char", "bias": bias,
              "init_from": "scratch", "dtype": "float32", "decay_lr": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "model_args": model_args,
                "iter_num": iter_num, "best_val_loss": torch.tensor(3.5), "config": config}, out_dir / "ckpt.pt")
    return model.eval()


# ---------------------------------------------------------------------------------------------- fixtures


class _Windows(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seed: int = 0):
        self.data = torch.randint(0, factories.VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def _save_tokenizer(src: Path, dest: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src).save_pretrained(dest)


@pytest.fixture(scope="module")
def hf_trainer_run(tmp_path_factory, tiny_tokenizer_dir):
    """transformers.Trainer, 4 steps, a checkpoint every 2: out/checkpoint-2, out/checkpoint-4."""
    from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("hf_trainer") / "out"
    torch.manual_seed(0)
    model = LlamaForCausalLM(factories.llama_config())
    args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to="none", use_cpu=True, logging_strategy="no",
                             dataloader_num_workers=0, include_num_input_tokens_seen=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Windows(),
                      processing_class=AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    trainer.train()
    return {"dir": out, "ckpt": out / "checkpoint-4", "model": trainer.model.eval(), "step": 4}


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory, tiny_tokenizer_dir):
    """PyTorch Lightning, 4 steps, ModelCheckpoint every 2: checkpoints/epoch=0-step=2.ckpt and ...step=4.ckpt."""
    pl = factories.require("pytorch_lightning", "formats")
    from transformers import LlamaConfig, LlamaForCausalLM

    class LitLM(pl.LightningModule):
        def __init__(self, config: dict):
            super().__init__()
            self.save_hyperparameters()  # hyper_parameters = {"config": <transformers config dict>}
            self.model = LlamaForCausalLM(LlamaConfig(**config))

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    root = tmp_path_factory.mktemp("lightning")
    ckpt_dir = root / "checkpoints"
    torch.manual_seed(0)
    module = LitLM(factories.llama_config().to_dict())
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root),
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=2,
                                                                 save_top_k=-1)])
    trainer.fit(module, torch.utils.data.DataLoader(_Windows(), batch_size=2))
    _save_tokenizer(tiny_tokenizer_dir, ckpt_dir)
    return {"dir": ckpt_dir, "ckpt": ckpt_dir / "epoch=0-step=4.ckpt", "model": module.model.eval(), "step": 4}


@pytest.fixture(scope="module")
def nanogpt_runs(tmp_path_factory, tiny_tokenizer_dir):
    """Two nanoGPT out_dirs: bias=True (plain), bias=False saved from a torch.compile'd model (`_orig_mod.`)."""
    root = tmp_path_factory.mktemp("nanogpt")
    runs = {}
    for name, bias, compiled, iter_num in (("out-bias", True, False, 250), ("out-nobias", False, True, 500)):
        model = write_nanogpt(root / name, bias=bias, iter_num=iter_num, compiled=compiled, seed=iter_num)
        _save_tokenizer(tiny_tokenizer_dir, root / name)
        runs[name] = {"dir": root / name, "ckpt": root / name / "ckpt.pt", "model": model, "step": iter_num}
    return runs


@pytest.fixture(scope="module")
def families(hf_trainer_run, lightning_run, nanogpt_runs):
    """{family label: run} with each run's `model` the framework's own module and `logits` its forward."""
    def hf_logits(model):
        return lambda ids: model(input_ids=ids).logits

    return {"hf_trainer": {**hf_trainer_run, "format": "hf", "logits": hf_logits(hf_trainer_run["model"])},
            "lightning": {**lightning_run, "format": "lightning", "logits": hf_logits(lightning_run["model"])},
            "nanogpt_bias": {**nanogpt_runs["out-bias"], "format": "nanogpt",
                             "logits": nanogpt_runs["out-bias"]["model"]},
            "nanogpt_nobias_compiled": {**nanogpt_runs["out-nobias"], "format": "nanogpt",
                                        "logits": nanogpt_runs["out-nobias"]["model"]}}


FAMILIES = ["hf_trainer", "lightning", "nanogpt_bias", "nanogpt_nobias_compiled"]


def _loss_cfg(tmp: Path, ckpt, shards: Path, *extra: str):
    return factories.compose(["mode=loss", f"ckpt={_quoted(ckpt)}", "data=local", f"data.dataset_path={shards}",
                              f"eval.seq_len={SEQ}", "eval.batch_size=4", "eval.steps=-1",
                              f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra])


def _quoted(path) -> str:
    from ckpteval.scan import quote_value

    return quote_value(str(path))


# ---------------------------------------------------------------------------------------------- detection


def test_config_enum_and_registry_agree():
    from ckpteval.config import CkptFormat

    names = {f.value for f in CkptFormat} - {"auto"}
    assert set(REGISTRY) <= names
    assert names - set(REGISTRY) <= {"torchtitan", "megatron"}  # the two families landing beside this one


@pytest.mark.parametrize("family", FAMILIES)
def test_detection_step_tokens_and_completeness(families, family):
    run = families[family]
    info = inspect_checkpoint(run["ckpt"])
    assert info.format == run["format"] and info.family is detect_format(run["ckpt"])
    assert info.step == run["step"]
    assert check_complete(run["ckpt"]) == (True, "")
    if family.startswith("nanogpt"):
        assert info.tokens_seen == run["step"] * 5 * 12 * 64  # iter_num x grad_accum x batch x block
        assert inspect_checkpoint(run["dir"]).path == run["ckpt"]  # the out_dir resolves to its ckpt.pt
        assert parse_step(run["ckpt"]) == run["step"]
    if family == "hf_trainer":
        assert info.tokens_seen == 4 * 2 * (SEQ + 1)  # trainer_state.json num_input_tokens_seen


@pytest.mark.parametrize("path,step", [("run/step-10", 10), ("iter_0000010", 10), ("out/checkpoint-30", 30),
                                       ("ckpts/epoch=0-step=10.ckpt", 10), ("epoch=3-step=1200.ckpt", 1200)])
def test_step_names(path, step):
    assert parse_step(path) == step


def test_truncated_files_are_incomplete(families, tmp_path):
    for family in ("lightning", "nanogpt_bias"):
        src = families[family]["ckpt"]
        cut = tmp_path / family / src.name
        cut.parent.mkdir()
        cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        ok, reason = check_complete(cut)
        assert not ok and str(cut) in reason and "ckpt_format=" in reason, reason


# ---------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_equals_the_frameworks_own_forward(families, family, tmp_path, tiny_token_shards, monkeypatch, caplog):
    run = families[family]
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="ckpteval.checkpoint.load"):
        result = app.main(_loss_cfg(tmp_path, run["ckpt"], tiny_token_shards))
    assert result["step"] == run["step"]
    assert abs(result["eval/loss"] - reference_loss(run["logits"], tiny_token_shards)) < 1e-5
    sources = [r.getMessage() for r in caplog.records if r.getMessage().startswith("architecture of")]
    expected = {"hf_trainer": "config.json in", "lightning": "the hyper_parameters in",
                "nanogpt_bias": "nanoGPT model_args", "nanogpt_nobias_compiled": "nanoGPT model_args"}[family]
    assert len(sources) == 1 and expected in sources[0], sources


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_parameters_are_dense(families, family):
    """A family's layout change (nanoGPT's transposed Linear weights) never leaves a strided view in the model:
    FSDP and TP shard only contiguous parameters (parallel=fsdp|tp), as from_pretrained's models have."""
    model = load_model(inspect_checkpoint(families[family]["ckpt"]))
    assert [n for n, p in model.named_parameters() if not p.is_contiguous()] == []


def test_forced_format_and_its_errors(families, tmp_path, tiny_token_shards, monkeypatch, capsys):
    run = families["nanogpt_bias"]
    monkeypatch.chdir(tmp_path)
    result = app.main(_loss_cfg(tmp_path, run["ckpt"], tiny_token_shards, "ckpt_format=nanogpt", "eval.steps=1"))
    assert result["step"] == run["step"]
    with pytest.raises(SystemExit) as exc:
        app.main(_loss_cfg(tmp_path, run["ckpt"], tiny_token_shards, "ckpt_format=lightning"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1
    assert "not a Lightning checkpoint" in err[0] and "ckpt_format=lightning was forced" in err[0], err


def test_model_group_contradicting_the_tensors_names_both(families, tmp_path, tiny_token_shards, monkeypatch, capsys):
    """A Lightning .ckpt with no config anywhere: the `model` group is the source; when it contradicts the
    checkpoint's tensors, the error names the source, the tensor, both shapes and the override."""
    from ckpteval.checkpoint.formats.lightning import STAND_INS
    from ckpteval.checkpoint.safe_pickle import torch_load

    data = torch_load(families["lightning"]["ckpt"], extra_globals=STAND_INS)
    data["hyper_parameters"] = {"lr": 0.01}
    bare = tmp_path / "bare" / "epoch=0-step=4.ckpt"
    bare.parent.mkdir()
    torch.save(data, bare)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        app.main(_loss_cfg(tmp_path, bare, tiny_token_shards, "model.hidden_size=96"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "the `model` group" in err[0] and "shape mismatch" in err[0], err
    assert "model.* overrides" in err[0]
    # ... and with the right model.* overrides it is the framework's loss
    c = families["lightning"]["model"].config
    arch = ["model.vocab_size=512", f"model.hidden_size={c.hidden_size}", f"model.intermediate_size={c.intermediate_size}",
            f"model.num_hidden_layers={c.num_hidden_layers}", f"model.num_attention_heads={c.num_attention_heads}",
            f"model.num_key_value_heads={c.num_key_value_heads}", "model.max_position_embeddings=256",
            f"model.rms_norm_eps={c.rms_norm_eps}"]
    result = app.main(_loss_cfg(tmp_path, bare, tiny_token_shards, *arch))
    assert abs(result["eval/loss"] - reference_loss(families["lightning"]["logits"], tiny_token_shards)) < 1e-5


# ---------------------------------------------------------------------------------------------- convert, harness


@pytest.fixture(scope="module")
def converted(families, tmp_path_factory):
    """mode=convert on each family's checkpoint -> {family: HF dir}."""
    tmp = tmp_path_factory.mktemp("converted")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        for family in FAMILIES:
            result = app.main(factories.compose(["mode=convert", f"ckpt={_quoted(families[family]['ckpt'])}",
                                                 f"convert.out={tmp / family}",
                                                 f"tracking.uri=sqlite:///{tmp}/mlflow.db"]))
            out[family] = Path(result["convert/out"])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_loads_in_stock_transformers_with_the_frameworks_loss(families, converted, family,
                                                                       tiny_token_shards):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = converted[family]
    assert (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(hf_dir)
    ref = reference_loss(families[family]["logits"], tiny_token_shards)
    assert abs(reference_loss(lambda ids: model(input_ids=ids).logits, tiny_token_shards) - ref) < 1e-5


def _stock_harness(hf_dir: Path, limit: int) -> dict[str, float]:
    """lm-eval alone: `simple_evaluate` with a plain HFLM on the HF dir that stock transformers loads."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(hf_dir), batch_size=8, device="cpu", dtype="float32")
    ref = simple_evaluate(model=lm, tasks=["ckpteval_mc", "ckpteval_rolling"], limit=limit, log_samples=False,
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                          random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    return {f"harness/{task}/{key.split(',')[0]}": value for task in ("ckpteval_mc", "ckpteval_rolling")
            for key, value in ref["results"][task].items() if "," in key and isinstance(value, float)}


@pytest.mark.parametrize("family", FAMILIES)
def test_harness_fast_backend_equals_stock_lm_eval(families, converted, family, tmp_path, monkeypatch):
    """mode=harness (fast backend) on the framework's checkpoint = stock HFLM on its converted dir (which the
    test above shows has the framework's own loss)."""
    monkeypatch.chdir(tmp_path)
    result = app.main(factories.compose([
        "mode=harness", f"ckpt={_quoted(families[family]['ckpt'])}", "harness=offline",
        f"harness.include_path={TASKS_DIR}", "harness.backend=fast", "harness.batch_size=8", "harness.seed=1234",
        "harness.limit=6", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]))
    assert result["step"] == families[family]["step"]
    reference = _stock_harness(converted[family], limit=6)
    assert reference
    for key, value in reference.items():
        assert result[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key  # perplexities are ~1e7


# ---------------------------------------------------------------------------------------------- watch, scan


def _mixed_dir(root: Path, families) -> dict[str, dict]:
    """One dir holding every family side by side, as checkpoints arrive: {name in root: run}."""
    root.mkdir()
    placed = {}
    hf = families["hf_trainer"]
    for n in (2, 4):
        shutil.copytree(hf["dir"] / f"checkpoint-{n}", root / f"checkpoint-{n}")
    placed["checkpoint-4"] = hf
    lit = families["lightning"]
    shutil.copy(lit["ckpt"], root / lit["ckpt"].name)
    shutil.copy(lit["dir"] / "epoch=0-step=2.ckpt", root / "epoch=0-step=2.ckpt")
    placed[lit["ckpt"].name] = lit
    nano = families["nanogpt_bias"]
    shutil.copytree(nano["dir"], root / "out-bias")
    placed["out-bias"] = nano
    return placed


def test_watch_once_evaluates_every_family(families, tmp_path, tiny_token_shards, monkeypatch):

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "ckpts"
    placed = _mixed_dir(root, families)
    nano_single = families["nanogpt_nobias_compiled"]
    shutil.copy(nano_single["ckpt"], root / "ckpt.pt")  # nanoGPT's one overwritten file, loose: step = iter_num
    db = tmp_path / "mlflow.db"
    summary = app.main(factories.compose([
        "mode=watch", f"watch.dir={root}", "watch.once=true", "watch.stable_s=0", "data=local",
        f"data.dataset_path={tiny_token_shards}", f"eval.seq_len={SEQ}", "eval.batch_size=4", "eval.steps=-1",
        f"tracking.uri=sqlite:///{db}"]))
    assert summary["watch/evaluated"] == 6 and summary["watch/failed"] == 0, summary
    client, runs = factories.mlflow_runs(db)
    losses = {Path(r.data.tags["ckpt"]).name: r.data.metrics.get("eval/loss") for r in runs if "ckpt" in r.data.tags
              and r.data.metrics.get("eval/loss") is not None}
    for name, run in {**placed, "ckpt.pt": nano_single}.items():
        assert abs(losses[name] - reference_loss(run["logits"], tiny_token_shards)) < 1e-5, name


@pytest.mark.slow
def test_glob_scan_over_every_family_cli(families, tmp_path, tiny_token_shards):
    """`python run.py -m ckpt='glob:ckpts/*'` over HF Trainer dirs, Lightning files (with `=`) and a nanoGPT
    out_dir: every job FINISHED with the framework's loss, in step order."""
    root = tmp_path / "ckpts"
    placed = _mixed_dir(root, families)
    db = tmp_path / "mlflow.db"
    proc = factories.run_cli(["-m", "mode=loss", "ckpt=glob:ckpts/*", "data=local",
                              f"data.dataset_path={tiny_token_shards}", f"eval.seq_len={SEQ}", "eval.batch_size=4",
                              "eval.steps=-1", f"tracking.uri=sqlite:///{db}", "hydra.sweep.dir=sweep"],
                             cwd=tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "sweep summary: 5 job(s), 5 completed" in proc.stdout
    client, runs = factories.mlflow_runs(db)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    by_name = {Path(r.data.tags["ckpt"]).name: r for r in children}
    assert len(children) == 5
    for name, run in placed.items():
        [point] = client.get_metric_history(by_name[name].info.run_id, "eval/loss")
        assert point.step == run["step"]
        assert abs(point.value - reference_loss(run["logits"], tiny_token_shards)) < 1e-5, name
    from ckpteval.scan import expand_pattern

    assert [Path(p).name for p in expand_pattern("ckpts/*", cwd=tmp_path)] == [
        "checkpoint-2", "epoch=0-step=2.ckpt", "checkpoint-4", "epoch=0-step=4.ckpt", "out-bias"]


@pytest.mark.slow
def test_lightning_path_with_equals_on_the_cli(families, tmp_path, tiny_token_shards):
    """`ckpt=/x/epoch=0-step=4.ckpt` unquoted: run.py hands Hydra the quoted form."""
    ckpt = families["lightning"]["ckpt"]
    proc = factories.run_cli(["mode=loss", f"ckpt={ckpt}", "data=local", f"data.dataset_path={tiny_token_shards}",
                              f"eval.seq_len={SEQ}", "eval.batch_size=4", "eval.steps=-1",
                              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = factories.last_json_line(proc.stdout)
    assert result["step"] == 4
    assert abs(result["eval/loss"] - reference_loss(families["lightning"]["logits"], tiny_token_shards)) < 1e-5


# ---------------------------------------------------------------------------------------------- safety


class _Payload:
    """Unpickling this calls os.system(touch MARKER): what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_nanogpt_and_lightning_pickles_never_run(tmp_path, tiny_token_shards, monkeypatch, capsys):
    marker = tmp_path / "PWNED"
    nano = tmp_path / "out" / "ckpt.pt"
    nano.parent.mkdir()
    torch.save({"model": {}, "model_args": {}, "iter_num": 1, "config": _Payload(marker)}, nano)
    lit = tmp_path / "lit" / "epoch=0-step=1.ckpt"
    lit.parent.mkdir()
    torch.save({"state_dict": {}, "global_step": 1, "hyper_parameters": _Payload(marker)}, lit)
    legacy = tmp_path / "legacy" / "ckpt.pt"  # the pre-zip torch format: a plain pickle stream
    legacy.parent.mkdir()
    legacy.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    monkeypatch.chdir(tmp_path)
    for ckpt in (nano, nano.parent, lit, legacy):
        ok, reason = check_complete(ckpt)
        assert not ok and "refusing to unpickle" in reason or "not a readable torch file" in reason, reason
        assert parse_step(ckpt) in (None, 1)
        with pytest.raises(SystemExit) as exc:
            app.main(_loss_cfg(tmp_path, ckpt, tiny_token_shards))
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert exc.value.code == 2 and len(err) == 1, err
    summary = app.main(factories.compose(["mode=watch", f"watch.dir={tmp_path / 'lit'}", "watch.once=true",
                                          "watch.stable_s=0", "tracking.enabled=false", "data=local",
                                          f"data.dataset_path={tiny_token_shards}", f"eval.seq_len={SEQ}"]))
    assert summary["watch/evaluated"] == 0
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- validation


def _peak_rss_script(ckpt: Path) -> str:
    return (f"import resource, sys\nfrom ckpteval.checkpoint import inspect_checkpoint, load_model\n"
            f"from ckpteval.errors import CkptEvalError\n"
            f"try:\n    load_model(inspect_checkpoint({str(ckpt)!r}))\n    print('LOADED')\n"
            f"except CkptEvalError as e:\n    print('ERROR', e)\n"
            f"print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")


@pytest.mark.parametrize("vocab", [12_000_000, 2_000_000_000, 2e9])
def test_absurd_config_fails_on_meta_before_allocating(tiny_hf_ckpt, tmp_path, vocab):
    """config.json claims a huge vocabulary: the meta-device check refuses it before any real allocation
    (the full model would need 3 GB / 512 GB); peak RSS of the whole process stays small."""
    ckpt = tmp_path / "step_1"
    shutil.copytree(tiny_hf_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "vocab_size": vocab}))
    proc = subprocess.run([sys.executable, "-c", _peak_rss_script(ckpt)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = proc.stdout.splitlines()
    # an int is checked against the tensors on `meta`; the float 2e9 is refused by the config validation
    expected = ("shape mismatch", "embed_tokens") if isinstance(vocab, int) else ("not a valid llama config",
                                                                                 "vocab_size")
    assert any(line.startswith("ERROR") and all(e in line for e in expected) for line in lines), \
        proc.stdout + proc.stderr[-2000:]
    peak_kb = int(next(line.split()[1] for line in lines if line.startswith("PEAK_KB")))
    assert peak_kb < 1.5 * 1024 * 1024, peak_kb


def _error_of(ckpt) -> str:
    with pytest.raises(CkptEvalError) as exc:
        from ckpteval.checkpoint import load_model

        load_model(inspect_checkpoint(ckpt))
    return str(exc.value)


def test_one_line_errors_for_broken_hf_dirs(tiny_hf_ckpt, tmp_path):
    def copy(name):
        d = tmp_path / name
        shutil.copytree(tiny_hf_ckpt, d)
        return d

    overflow = copy("overflow")
    data = (overflow / "model.safetensors").read_bytes()
    (overflow / "model.safetensors").write_bytes((2**63 + 5).to_bytes(8, "little") + data[8:])
    assert "header length field" in _error_of(overflow)

    unknown = copy("unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_arch"}))
    assert "model_type 'no_such_arch'" in _error_of(unknown)

    invalid = copy("invalid")
    (invalid / "config.json").write_text('{"model_type": "llama", ')
    message = _error_of(invalid)
    assert "config.json is not valid JSON" in message and "tokenizer" not in message

    for name, payload in (("garbage", b"\x00not a pickle" * 50), ("refused", None)):
        d = copy(name)
        (d / "model.safetensors").unlink()
        if payload is None:
            marker = tmp_path / "PWNED"
            torch.save({"x": _Payload(marker)}, d / "pytorch_model.bin")
            assert "refusing to unpickle" in _error_of(d) and not marker.exists()
        else:
            (d / "pytorch_model.bin").write_bytes(payload)
            assert "not a readable torch file" in _error_of(d)
    for message in (_error_of(overflow), _error_of(unknown), _error_of(invalid)):
        assert "\n" not in message


def test_unknown_path_names_every_family_and_the_override(tmp_path):
    junk = tmp_path / "weights.npz"
    junk.write_bytes(b"junk")
    ok, reason = check_complete(junk)
    assert not ok and "not a recognised checkpoint" in reason and "ckpt_format=NAME" in reason
    for name in REGISTRY:
        assert f"ckpt_format={name}" in reason


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("family,layout", [("lightning", "fsdp"), ("lightning", "tp"), ("nanogpt_bias", "fsdp"),
                                           ("hf_trainer", "pp")])
def test_whole_read_families_under_torchrun(families, family, layout, tmp_path, tiny_token_shards):
    """Families without a sharded DCP read are read whole (model tensors only) on each rank, then laid out."""
    from tests.test_parallel import _torchrun

    run = families[family]
    proc = factories.run_cli(["mode=loss", f"parallel={layout}", f"ckpt={run['ckpt']}", "data=local",
                              f"data.dataset_path={tiny_token_shards}", f"eval.seq_len={SEQ}", "eval.batch_size=4",
                              "eval.steps=-1", "parallel.microbatches=2", f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                             cwd=tmp_path, timeout=400, launcher=_torchrun())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = factories.last_json_line(proc.stdout)
    assert result["step"] == run["step"]
    assert abs(result["eval/loss"] - reference_loss(run["logits"], tiny_token_shards)) < 1e-5

"""PEFT LoRA adapters (LoRA, DoRA, rsLoRA on all linear layers, modules_to_save with a resized vocabulary) written
by PEFT itself (`save_pretrained`) and by `transformers.Trainer` (checkpoint-N dirs), read by the `peft` family and
scored against PEFT's OWN `PeftModel.from_pretrained(base, dir)` forward on the same windows (float32, 1e-5).

The fast tests use adapters PEFT saves directly (random LoRA weights, a second or so); the Trainer-written run
is one module fixture shared by the slow tests (scans, the watcher, the harness, convert, torchrun).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpteval.checkpoint import base_cache, inspect_checkpoint, load_model
from ckpteval.checkpoint.formats import detect_format, get_format
from ckpteval.tasks import TASKS_DIR
from tests import factories, framework_ckpts

factories.require("peft", "peft")

SEQ = 64
_files = factories.shard_arrays
_loss_cfg = functools.partial(factories.loss_cfg, seq_len=SEQ)
ADDED = 8  # tokens added to the tokenizer (and rows to the embedding) for the modules_to_save adapter


@pytest.fixture(autouse=True)
def _fresh_base_cache():
    """Every test starts and ends with no base held (the cache is process-wide)."""
    base_cache.release(collect=False)
    yield
    base_cache.release(collect=False)


def _base_model(base_dir: Path, vocab: int | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if vocab is not None and vocab != model.config.vocab_size:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return model.eval()


def peft_reference(base_dir: Path, adapter: Path, vocab: int | None = None, merged: bool = False):
    """PEFT's own model: `PeftModel.from_pretrained` on the base (resized first when the adapter added tokens),
    the adapter applied on top (or PEFT's own merge_and_unload)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base_model(base_dir, vocab), str(adapter)).eval()
    return model.merge_and_unload().eval() if merged else model


def _peft_loss(base_dir: Path, adapter: Path, shards: Path, vocab: int | None = None, merged: bool = False) -> float:
    return factories.reference_loss(peft_reference(base_dir, adapter, vocab, merged), _files(shards), SEQ)


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def _app_error(cfg, capsys) -> str:
    """The one `error:` line a job prints (tracking off: the error is the point, not the MLflow store)."""
    from ckpteval import app

    cfg.tracking.enabled = False
    with pytest.raises(SystemExit) as exc:
        app.main(cfg)
    assert exc.value.code == 2
    return _error_line(capsys)


# ---------------------------------------------------------------------------------------------- PEFT-saved adapters


def save_adapter(base_dir: Path, out: Path, vocab: int | None = None, kind: str = "LORA", seed: int = 0,
                 **lora) -> Path:
    """An adapter saved by PEFT's own `save_pretrained` (random weights: LoRA B is not zero)."""
    import peft

    model = _base_model(base_dir, vocab)
    torch.manual_seed(seed)
    if kind == "LORA":
        config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora)
    elif kind == "IA3":
        config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                feedforward_modules=["down_proj"])
    else:
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny Llama base (HF dir + tokenizer) and adapters PEFT saved for it: LoRA (q, v), DoRA (all linear),
    rsLoRA, and LoRA + modules_to_save on a vocabulary resized by ADDED tokens."""
    root = tmp_path_factory.mktemp("peft_saved")
    base = factories.make_hf_checkpoint(root / "base", tiny_tokenizer_dir, seed=1)
    vocab = factories.VOCAB + ADDED
    return {
        "root": root, "base": base,
        "lora": save_adapter(base, root / "lora", r=4, target_modules=["q_proj", "v_proj"]),
        "dora": save_adapter(base, root / "dora", seed=1, r=4, target_modules="all-linear", use_dora=True),
        "dora2": save_adapter(base, root / "dora2", seed=4, r=4, target_modules="all-linear", use_dora=True),
        "rslora": save_adapter(base, root / "rslora", seed=2, r=4, target_modules="all-linear", use_rslora=True),
        "resized": save_adapter(base, root / "resized", vocab, seed=3, r=4, target_modules=["q_proj"],
                                modules_to_save=["embed_tokens", "lm_head"]),
        "resized2": save_adapter(base, root / "resized2", vocab, seed=5, r=4, target_modules=["q_proj"],
                                 modules_to_save=["embed_tokens", "lm_head"]),
    }


def _vocab(kind: str) -> int | None:
    return factories.VOCAB + ADDED if kind.startswith("resized") else None


def test_adapter_dir_detected_with_its_base(saved):
    adapter = saved["lora"]
    assert detect_format(adapter).name == "peft"
    info = inspect_checkpoint(adapter)
    assert info.format == "peft" and info.base.format == "hf" and info.base.path == saved["base"]
    assert info.tokenizer_path == saved["base"]  # none in the adapter dir: the base's
    get_format("peft").check_complete(adapter)  # complete: raises nothing
    assert info.step is None and info.tokens_seen is None


def test_hf_format_forced_on_an_adapter_points_at_peft(saved, tmp_path, tiny_token_shards, capsys):
    line = _app_error(_loss_cfg(tmp_path, saved["lora"], tiny_token_shards, "ckpt_format=hf"), capsys)
    assert "is a PEFT adapter" in line and "ckpt_format=peft" in line, line


@pytest.mark.parametrize("kind", ["lora", "dora", "rslora", "resized"])
def test_merged_equals_peftmodel_forward(saved, kind, tiny_token_shards):
    """Our merged model = PEFT's PeftModel (adapter on top) and PEFT's own merge_and_unload, float32, 1e-5; the
    base alone is detectably different."""
    model = load_model(inspect_checkpoint(saved[kind]))
    ours = factories.reference_loss(model, _files(tiny_token_shards), SEQ)
    on_top = _peft_loss(saved["base"], saved[kind], tiny_token_shards, _vocab(kind))
    merged = _peft_loss(saved["base"], saved[kind], tiny_token_shards, _vocab(kind), merged=True)
    base = factories.reference_loss(_base_model(saved["base"]), _files(tiny_token_shards), SEQ)
    assert abs(ours - on_top) < 1e-5 and abs(ours - merged) < 1e-5, (ours, on_top, merged)
    assert abs(base - on_top) > 1e-3, (base, on_top)


def test_one_base_swaps_adapters_exactly(saved):
    """Loaded through the shared base one after another, each adapter gives exactly a fresh load's logits (also
    when the next adapter of the same LoraConfig reuses PEFT's layers: dora -> dora2 -> dora, resized ->
    resized2 -> resized); the base is loaded once per (base, vocabulary), and after an undo it is bit for bit the
    base again (modules, tensors, config, attributes), whether the adapter was the first of its config or not."""
    from ckpteval.checkpoint.formats import peft as peft_family

    ids = torch.randint(0, factories.VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    pristine = load_model(inspect_checkpoint(saved["base"]))
    loads = base_cache.loads
    injected = []
    kinds = ("lora", "dora", "dora2", "dora", "rslora", "lora", "resized", "resized2", "resized")
    for i, kind in enumerate(kinds):
        shared = load_model(inspect_checkpoint(saved[kind]), shared_base=True)
        injected.append(base_cache._held.undo.kept)
        fresh = load_model(inspect_checkpoint(saved[kind]))
        # plain modules, as merge_and_unload leaves them
        assert [type(m) for m in shared.modules()] == [type(m) for m in fresh.modules()], kind
        with torch.no_grad():
            got = shared(ids).logits
            want = fresh(ids).logits
        assert torch.equal(got, want), kind
        if kind == "rslora" or kinds[i - 1] == "dora2":  # undo a reused and a fresh injection: the pristine base
            held = base_cache._held
            held.undo()
            held.undo = None
            state, ref = held.model.state_dict(), pristine.state_dict()
            assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
            assert held.model.config.to_dict() == pristine.config.to_dict()
            assert set(held.model.__dict__) == set(pristine.__dict__)
            assert [type(m) for m in held.model.modules()] == [type(m) for m in pristine.modules()]
    assert base_cache.loads - loads == 2  # the base, then the base resized for the added tokens
    reused = [kinds[i] for i in range(1, len(kinds)) if injected[i] is injected[i - 1]]
    assert reused == ["dora2", "dora", "resized2", "resized"] and isinstance(injected[1], peft_family._Injected), reused


def test_loading_an_adapter_draws_no_random_numbers(saved):
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    load_model(inspect_checkpoint(saved["dora"]), shared_base=True)
    load_model(inspect_checkpoint(saved["resized"]))
    assert torch.equal(torch.get_rng_state(), rng)


def test_adapter_bin_read_through_the_allow_list(saved, tmp_path, tiny_token_shards):
    from safetensors.torch import load_file

    adapter = tmp_path / "bin_adapter"
    shutil.copytree(saved["dora"], adapter)
    state = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(state, adapter / "adapter_model.bin")
    ours = factories.reference_loss(load_model(inspect_checkpoint(adapter)), _files(tiny_token_shards), SEQ)
    assert abs(ours - _peft_loss(saved["base"], saved["dora"], tiny_token_shards)) < 1e-5


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_adapter_bin_runs_nothing(saved, tmp_path, tiny_token_shards, capsys):
    marker = tmp_path / "PWNED"
    adapter = tmp_path / "checkpoint-5"
    shutil.copytree(saved["lora"], adapter)
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Payload(marker)},
               adapter / "adapter_model.bin")
    ok, reason = __import__("ckpteval.checkpoint", fromlist=["check_complete"]).check_complete(adapter)
    assert not ok and "refusing to unpickle" in reason and "system" in reason, reason
    line = _app_error(_loss_cfg(tmp_path, adapter, tiny_token_shards), capsys)
    assert "refusing to unpickle" in line and "system" in line, line
    assert not marker.exists()


def test_missing_base_is_one_line_naming_ckpt_base(saved, tmp_path, tiny_token_shards, capsys, monkeypatch):
    """A hub id with no local copy: one line saying the base is not available offline and naming ckpt_base=; with
    ckpt_base= the same adapter evaluates to PEFT's loss. Nothing is downloaded (the hub cache is an empty dir)."""
    import huggingface_hub

    from ckpteval import app

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.chdir(tmp_path)
    adapter = tmp_path / "adapter"
    shutil.copytree(saved["lora"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "acme/tiny-base"}))
    for forced in ([], ["ckpt_format=peft"]):
        line = _app_error(_loss_cfg(tmp_path, adapter, tiny_token_shards, *forced), capsys)
        assert "'acme/tiny-base'" in line and "not available offline" in line and "ckpt_base=PATH" in line, line
    line = _app_error(_loss_cfg(tmp_path, adapter, tiny_token_shards, f"ckpt_base={tmp_path / 'nope'}"), capsys)
    assert "ckpt_base=" in line and "does not exist" in line, line
    result = app.main(_loss_cfg(tmp_path, adapter, tiny_token_shards, f"ckpt_base={saved['base']}",
                                "tracking.enabled=false"))
    assert abs(result["eval/loss"] - _peft_loss(saved["base"], saved["lora"], tiny_token_shards)) < 1e-5


def test_hub_id_base_found_in_the_local_cache(saved, tmp_path, tiny_token_shards, monkeypatch):
    """base_model_name_or_path = a hub id that the local HF cache holds (the layout huggingface_hub writes):
    found offline through huggingface_hub's own cache lookup."""
    import huggingface_hub

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-base"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(saved["base"], snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    adapter = tmp_path / "adapter"
    shutil.copytree(saved["rslora"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "acme/tiny-base"}))
    info = inspect_checkpoint(adapter)
    assert info.base.path == snapshot.resolve()
    ours = factories.reference_loss(load_model(info), _files(tiny_token_shards), SEQ)
    assert abs(ours - _peft_loss(saved["base"], saved["rslora"], tiny_token_shards)) < 1e-5


@pytest.mark.parametrize("kind,name", [("IA3", "IA3"), ("PREFIX", "PREFIX_TUNING")])
def test_unsupported_adapter_types_refused_by_name(saved, tmp_path, tiny_token_shards, capsys, kind, name):
    adapter = save_adapter(saved["base"], tmp_path / "adapter", kind=kind)
    assert detect_format(adapter).name == "peft"
    line = _app_error(_loss_cfg(tmp_path, adapter, tiny_token_shards), capsys)
    assert f"is a PEFT {name} adapter" in line and "LoRA adapters" in line, line


def test_adapter_of_another_model_refused_before_allocating(saved, tmp_path, tiny_tokenizer_dir, tiny_token_shards,
                                                            capsys, monkeypatch):
    """The adapter's tensors are checked against the base's architecture on `meta`: nothing is allocated."""
    from ckpteval.checkpoint import load as load_module

    other = factories.make_hf_checkpoint(tmp_path / "wide_base", tiny_tokenizer_dir, hidden=96, heads=4)
    monkeypatch.setattr(load_module, "load_weights", lambda *a, **k: pytest.fail("allocated and read the base"))
    line = _app_error(_loss_cfg(tmp_path, saved["lora"], tiny_token_shards, f"ckpt_base={other}"), capsys)
    assert "does not fit its base" in line and "is (4, 64) in the adapter but (4, 96) for the base" in line, line


def test_adapter_as_base_refused(saved, tmp_path, tiny_token_shards, capsys):
    line = _app_error(_loss_cfg(tmp_path, saved["lora"], tiny_token_shards, f"ckpt_base={saved['dora']}"), capsys)
    assert "is itself an adapter" in line and "mode=convert" in line, line


def test_base_of_another_family_dcp(saved, tmp_path, tiny_token_shards):
    """The base is read by its own family (here a DCP dir with config.json beside its shards)."""
    import torch.distributed.checkpoint as dcp

    base = tmp_path / "step_100"
    dcp.save({"model": _base_model(saved["base"]).state_dict()}, checkpoint_id=str(base), no_dist=True)
    shutil.copy(saved["base"] / "config.json", base / "config.json")
    info = inspect_checkpoint(saved["dora"], ckpt_base=str(base))
    assert info.base.format == "dcp"
    ours = factories.reference_loss(load_model(info), _files(tiny_token_shards), SEQ)
    assert abs(ours - _peft_loss(saved["base"], saved["dora"], tiny_token_shards)) < 1e-5


# ---------------------------------------------------------------------------------------------- Trainer-written runs


def _windows(shards: Path) -> list[dict]:
    out = []
    for arr in _files(shards):
        arr = arr.astype(np.int64)
        for k in range((len(arr) - 1) // SEQ):
            w = torch.from_numpy(arr[k * SEQ: k * SEQ + SEQ])
            out.append({"input_ids": w, "labels": w})
    return out


def train_adapter(base_dir: Path, tokenizer, out: Path, data: list[dict], steps: int, save_steps: int,
                  vocab: int | None = None, **lora) -> Path:
    """`transformers.Trainer` on a PEFT model, as a fine-tuning script runs it: checkpoint-N dirs (adapter,
    trainer_state.json, optimizer/scheduler/RNG state, tokenizer)."""
    import peft
    from transformers import Trainer, TrainingArguments

    model = peft.get_peft_model(_base_model(base_dir, vocab).train(), peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=save_steps, per_device_train_batch_size=4,
                             learning_rate=2e-2, report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True,
                             seed=0, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer_dir, tiny_token_shards):
    """Trainer runs on one base: run/checkpoint-{1,2,3} (LoRA on q, v), dora/checkpoint-2 (DoRA on attention),
    rslora/checkpoint-2 (rsLoRA, all linear layers), resized/checkpoint-2 (LoRA + modules_to_save embed_tokens and
    lm_head, after adding tokens to the tokenizer and resizing the base, as users do)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("peft_trained")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)  # one token per embedding row, as released
    tokenizer.add_tokens([f"<unused_{i}>" for i in range(factories.VOCAB - len(tokenizer))])  # tokenizers have
    tokenizer.save_pretrained(root / "tokenizer")
    base = factories.make_hf_checkpoint(root / "base", root / "tokenizer", seed=2)
    data = _windows(tiny_token_shards)
    train_adapter(base, tokenizer, root / "run", data, 3, 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    train_adapter(base, tokenizer, root / "dora", data, 2, 2, r=4, use_dora=True,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    train_adapter(base, tokenizer, root / "rslora", data, 2, 2, r=4, use_rslora=True, target_modules="all-linear")
    added = AutoTokenizer.from_pretrained(root / "tokenizer")
    added.add_tokens([f"<extra_{i}>" for i in range(ADDED)])
    train_adapter(base, added, root / "resized", data, 2, 2, len(added), r=4, target_modules=["q_proj"],
                  modules_to_save=["embed_tokens", "lm_head"])
    ckpts = {"lora": root / "run" / "checkpoint-3", "dora": root / "dora" / "checkpoint-2",
             "rslora": root / "rslora" / "checkpoint-2", "resized": root / "resized" / "checkpoint-2"}
    return {"root": root, "base": base, "run": root / "run", **ckpts}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dora", "rslora", "resized"])
def test_trainer_checkpoint_mode_loss_equals_peftmodel(trained, kind, tmp_path, tiny_token_shards, monkeypatch):
    from ckpteval import app

    monkeypatch.chdir(tmp_path)
    ckpt = trained[kind]
    assert not (ckpt / "config.json").exists() and (ckpt / "optimizer.pt").is_file()
    result = app.main(_loss_cfg(tmp_path, ckpt, tiny_token_shards, "tracking.enabled=false"))
    ref = _peft_loss(trained["base"], ckpt, tiny_token_shards, _vocab(kind))
    assert result["step"] == int(ckpt.name.split("-")[1])
    assert abs(result["eval/loss"] - ref) < 1e-5, (result, ref)
    base = factories.reference_loss(_base_model(trained["base"]), _files(tiny_token_shards), SEQ)
    assert abs(base - ref) > 1e-4, (base, ref)  # the adapter moves the loss: ignoring it would be caught


@pytest.mark.slow
def test_scan_in_one_process_loads_base_once_and_equals_fresh_jobs(trained, tmp_path, tiny_token_shards,
                                                                  monkeypatch):
    """Jobs one after another in one process (as a -m scan and the watcher run them): the base loads once, and
    every checkpoint's numbers are identical to a job that loaded everything afresh."""
    from ckpteval import app

    monkeypatch.chdir(tmp_path)
    ckpts = [trained["run"] / f"checkpoint-{k}" for k in (1, 2, 3)]
    loads = base_cache.loads
    scanned = [app.main(_loss_cfg(tmp_path, c, tiny_token_shards, "tracking.enabled=false")) for c in ckpts]
    assert base_cache.loads - loads == 1
    for ckpt, result in zip(ckpts, scanned):
        base_cache.release()
        fresh = app.main(_loss_cfg(tmp_path, ckpt, tiny_token_shards, "tracking.enabled=false"))
        assert fresh["eval/loss"] == result["eval/loss"] and fresh["eval/bpb"] == result["eval/bpb"], ckpt
        ref = _peft_loss(trained["base"], ckpt, tiny_token_shards)
        assert abs(result["eval/loss"] - ref) < 1e-5
    assert len({r["eval/loss"] for r in scanned}) == 3


@pytest.mark.slow
def test_glob_scan_cli_loads_base_once(trained, tmp_path, tiny_token_shards):
    db = tmp_path / "mlflow.db"
    proc = factories.run_cli(["-m", "mode=loss", f"ckpt=glob:{trained['run']}/checkpoint-*", "data=local",
                              f"data.dataset_path={tiny_token_shards}", f"eval.seq_len={SEQ}", "eval.batch_size=8",
                              "eval.steps=-1", f"tracking.uri=sqlite:///{db}", "hydra.sweep.dir=sweep"],
                             cwd=tmp_path, timeout=500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "sweep summary: 3 job(s), 3 completed" in proc.stdout
    assert out.count("loaded once for this process") == 1 and out.count("reusing the one loaded") == 2, out[-3000:]
    client, runs = factories.mlflow_runs(db)
    points = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId"):
            [point] = client.get_metric_history(r.info.run_id, "eval/loss")
            points[Path(r.data.tags["ckpt"]).name] = (point.step, point.value)
    assert set(points) == {"checkpoint-1", "checkpoint-2", "checkpoint-3"}
    for name, (step, loss) in points.items():
        ref = _peft_loss(trained["base"], trained["run"] / name, tiny_token_shards)
        assert step == int(name.split("-")[1]) and abs(loss - ref) < 1e-5, name


@pytest.mark.slow
def test_watch_once_over_the_run_dir(trained, tmp_path, tiny_token_shards, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    loads = base_cache.loads
    summary, losses = framework_ckpts.watch_once_losses(run, tiny_token_shards, SEQ, tmp_path / "m.db")
    assert summary["watch/evaluated"] == 3 and summary["watch/failed"] == 0, summary
    assert base_cache.loads - loads == 1
    assert set(losses) == {"checkpoint-1", "checkpoint-2", "checkpoint-3"}
    for name, loss in losses.items():
        assert abs(loss - _peft_loss(trained["base"], run / name, tiny_token_shards)) < 1e-5, name


@pytest.mark.slow
def test_harness_equals_lm_eval_on_peftmodel_and_convert_loads_in_stock_tools(trained, tmp_path, monkeypatch,
                                                                             tiny_token_shards):
    """mode=harness (fast and hf backends) = lm-eval's HFLM with `peft=` (PEFT's own PeftModel) = HFLM on the
    mode=convert output, which stock transformers loads with PEFT's logits."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    from ckpteval import app
    from lm_eval import simple_evaluate

    monkeypatch.chdir(tmp_path)
    ckpt = trained["dora"]
    ours, converted, hf_dir = framework_ckpts.harness_vs_stock(ckpt, tmp_path)
    ours_hf = app.main(factories.compose([  # the other in-memory backend: lm-eval's HFLM on our merged model
        "mode=harness", f"ckpt={ckpt}", "harness=offline", f"harness.include_path={TASKS_DIR}", "harness.backend=hf",
        "harness.batch_size=8", "harness.seed=1234", "harness.limit=6", "tracking.enabled=false"]))
    lm = HFLM(pretrained=str(trained["base"]), peft=str(ckpt), batch_size=8, device="cpu", dtype="float32")
    ref = simple_evaluate(model=lm, tasks=["ckpteval_mc", "ckpteval_rolling"], limit=6, log_samples=False,
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                          random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    stock = {f"harness/{task}/{key.split(',')[0]}": value for task in ("ckpteval_mc", "ckpteval_rolling")
             for key, value in ref["results"][task].items() if "," in key and isinstance(value, float)}
    assert stock and ours["step"] == 2 and set(stock) == set(converted)
    for key, value in stock.items():  # merged weights vs the adapter on top: float32 rounding apart, so
        for got in (ours[key], ours_hf[key], converted[key]):  # perplexities (~1e8 here): as logs, like losses
            if "perplexity" in key:
                assert abs(math.log(got) - math.log(value)) < 1e-5, (key, got, value)
            else:
                assert got == pytest.approx(value, rel=1e-6, abs=1e-5), (key, got, value)

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, factories.VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids).logits - peft_reference(trained["base"], ckpt)(ids).logits).abs().max().item()
    assert diff < 1e-4, diff  # logits of a head scaled x8 (|logit| ~ 10): loss-level agreement is 1e-5
    ref_loss = _peft_loss(trained["base"], ckpt, tiny_token_shards)
    assert abs(factories.reference_loss(model, _files(tiny_token_shards), SEQ) - ref_loss) < 1e-5


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_fsdp(trained, tmp_path, tiny_token_shards):
    """parallel=fsdp under torchrun: the adapter merged into its base on each rank, then sharded."""
    loss = framework_ckpts.torchrun_loss(trained["resized"], "fsdp", tiny_token_shards, SEQ, tmp_path)
    ref = _peft_loss(trained["base"], trained["resized"], tiny_token_shards, _vocab("resized"))
    assert abs(loss - ref) < 1e-5, (loss, ref)

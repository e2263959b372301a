"""OLMo-core checkpoints written by OLMo-core's own Trainer (its CheckpointerCallback + ConfigSaverCallback, on the
token shards; tests/framework_ckpts.py), read by the olmo_core family and scored against OLMo-core's OWN forward
(each step loaded by its own `load_model_and_optim_state`, float32, 1e-5). Three runs: OLMo 2 (reordered norms,
QK-norm, GQA), OLMo 3 (+ a sliding-window layer) and a Llama-like one (pre-norm, complex RoPE, tied embeddings);
plus OLMo-core's own HF export of the OLMo 2 run (max_position_embeddings -1)."""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpteval.checkpoint.formats import detect_format, get_format
from ckpteval.checkpoint.formats import olmo_core as oc_fmt
from ckpteval.errors import CkptEvalError
from tests import factories, framework_ckpts

# The framework writes its checkpoints in a subprocess (module fixture): the end-to-end tier, not the fast one.
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _framework():  # when a test here runs (not at collection: the default tier, which runs none, skips nothing)
    factories.require("olmo_core", "olmo_core")


SEQ = 64
_files = factories.shard_arrays
_our_loss = functools.partial(factories.family_loss, seq_len=SEQ)
_loss_cfg = functools.partial(factories.loss_cfg, seq_len=SEQ)
STEPS = ["olmo2/step0", "olmo2/step2", "olmo2/step4", "olmo3/step0", "olmo3/step2", "llama/step0", "llama/step2"]


@pytest.fixture(scope="module")
def oc_run(tmp_path_factory, tiny_token_shards, tiny_tokenizer_dir):
    """{olmo2,olmo3,llama}/stepN (Trainer checkpoints with the run's config.json) and hf_export/."""
    out = tmp_path_factory.mktemp("olmo_core") / "runs"
    ref = framework_ckpts.run("olmo_core", out, tiny_token_shards, SEQ, "--tokenizer", str(tiny_tokenizer_dir))
    return out, ref


def _copy_step(run: Path, rel: str, dest: Path) -> Path:
    shutil.copytree(run / rel, dest / rel)
    return dest / rel


# ---------------------------------------------------------------------------------------------- the family


def test_olmo_core_step_dir_and_dcp_dir_detected_complete_with_step_and_tokens(oc_run):
    run, _ = oc_run
    for path in (run / "olmo2/step4", run / "olmo2/step4/model_and_optim"):
        fmt = detect_format(path)
        assert fmt is not None and fmt.name == "olmo_core", path
        fmt.check_complete(path)
        assert fmt.step_tokens(path) == (4, 4 * 4 * SEQ)  # global_train_tokens_seen from train/rank0.pt
    assert get_format("olmo_core").step_tokens(run / "olmo2/step0") == (0, 0)


@pytest.mark.parametrize("rel", STEPS)
def test_olmo_core_loss_equals_olmo_core_forward(oc_run, rel, tiny_token_shards):
    run, ref = oc_run
    loss, source = _our_loss(run / rel, tiny_token_shards)
    assert f"{rel}/config.json" in source
    assert abs(loss - ref["loss"][rel]) < 1e-5, (rel, loss, ref["loss"][rel])


def test_olmo_core_mapping_equals_olmo_cores_own_hf_export(oc_run):
    """Our tensors for OLMo 2 are exactly what OLMo-core's own save_hf_model wrote for the same weights."""
    from safetensors.torch import load_file

    run, _ = oc_run
    fmt = get_format("olmo_core")
    step = run / "olmo2/step4"
    ours = fmt.read_state(step, fmt.architecture(step).config)
    theirs = load_file(str(run / "hf_export" / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_olmo_core_architectures(oc_run):
    run, _ = oc_run
    fmt = get_format("olmo_core")
    olmo3 = fmt.architecture(run / "olmo3/step2").config
    assert olmo3.model_type == "olmo3" and olmo3.sliding_window == 16
    assert olmo3.layer_types == ["sliding_attention", "full_attention"]
    llama = fmt.architecture(run / "llama/step2").config
    assert llama.model_type == "llama" and llama.tie_word_embeddings
    assert fmt.architecture(run / "olmo2/step2").config.max_position_embeddings == SEQ  # the run's sequence length


def test_olmo_core_wrong_mappings_are_detectably_wrong(oc_run, tiny_token_shards, monkeypatch):
    """Norms placed as in a pre-norm block (OLMo 2 normalises sublayer outputs), or complex-RoPE q/k rows left
    unpermuted: both run, both score a different function."""
    run, ref = oc_run
    swapped = dict(oc_fmt.NORMS, reordered_norm={"attention_norm.weight": "post_feedforward_layernorm.weight",
                                                 "feed_forward_norm.weight": "post_attention_layernorm.weight"})
    monkeypatch.setattr(oc_fmt, "NORMS", swapped)
    loss, _ = _our_loss(run / "olmo2/step4", tiny_token_shards)
    assert abs(loss - ref["loss"]["olmo2/step4"]) > 1e-4, loss
    monkeypatch.undo()
    monkeypatch.setattr(oc_fmt._common, "rope_pairs_to_halves", lambda w, n_heads: w)
    loss, _ = _our_loss(run / "llama/step2", tiny_token_shards)
    assert abs(loss - ref["loss"]["llama/step2"]) > 1e-4, loss


def test_olmo_core_reads_only_model_tensors(oc_run, monkeypatch):
    run, _ = oc_run
    step = run / "olmo2/step4"
    asked: list[str] = []
    real = oc_fmt.read_dcp_tensors
    monkeypatch.setattr(oc_fmt, "read_dcp_tensors", lambda p, wanted: (asked.extend(wanted), real(p, wanted))[1])
    fmt = get_format("olmo_core")
    fmt.read_state(step, fmt.architecture(step).config)
    meta = oc_fmt.read_dcp_metadata(step / "model_and_optim").state_dict_metadata
    assert any(k.startswith("optim.") for k in meta)
    assert asked and all(k.startswith("model.") for k in asked)


def test_olmo_core_storage_info_is_read_as_torchs_own_without_importing_olmo_core(oc_run):
    """OLMo-core's .metadata pickles olmo_core...filesystem._StorageInfo: read as torch's _StorageInfo, in a
    process where olmo_core is never imported (this test process imports it to write checkpoints)."""
    run, _ = oc_run
    code = ("import sys; from ckpteval.checkpoint.safe_pickle import load_dcp_metadata; "
            f"m = load_dcp_metadata({str(run / 'olmo2/step4/model_and_optim')!r}); "
            "info = next(iter(m.storage_data.values())); "
            "print(type(info).__module__, type(info).__name__, info.relative_path, "
            "any(k.startswith('olmo_core') for k in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    module, name, rel, imported = proc.stdout.split()
    assert (module, name, imported) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo", "False")
    assert rel.endswith(".distcp")


def test_olmo_core_incomplete_step_is_refused(oc_run, tmp_path):
    run, _ = oc_run
    step = _copy_step(run, "olmo2/step2", tmp_path)
    (step / ".metadata.json").unlink()
    with pytest.raises(CkptEvalError, match=r"\.metadata\.json is missing \(its checkpointer writes it last"):
        get_format("olmo_core").check_complete(step)
    (step / "model_and_optim" / ".metadata").unlink()
    assert detect_format(step).name == "olmo_core"  # still ours: check_complete says what is missing
    with pytest.raises(CkptEvalError, match=r"model_and_optim/\.metadata is missing"):
        get_format("olmo_core").check_complete(step)


@pytest.mark.parametrize(("edit", "named"), [
    (lambda m: m["block"].update(name="peri_norm"), "block.name='peri_norm'"),
    (lambda m: m["block"]["sequence_mixer"]["rope"].update(scaling={"factor": 8.0}), "rope.scaling"),
    (lambda m: m["block"]["sequence_mixer"].update(use_head_qk_norm=True), "per-head QK-norm"),
    (lambda m: m.update(name="moe"), "model.name='moe'"),
])
def test_olmo_core_unsupported_model_is_refused_by_name(oc_run, tmp_path, edit, named):
    run, _ = oc_run
    step = _copy_step(run, "olmo2/step2", tmp_path)
    data = json.loads((step / "config.json").read_text())
    edit(data["model"])
    (step / "config.json").write_text(json.dumps(data))
    with pytest.raises(CkptEvalError, match=r"describes a model with .*no transformers counterpart") as e:
        get_format("olmo_core").architecture(step)
    assert named in str(e.value)


def test_olmo_core_unsupported_block_through_the_app_is_one_error_line(oc_run, tmp_path, tiny_token_shards,
                                                                       monkeypatch, capsys):
    from ckpteval import app

    run, _ = oc_run
    step = _copy_step(run, "olmo2/step2", tmp_path)
    data = json.loads((step / "config.json").read_text())
    data["model"]["block"]["name"] = "normalized"
    (step / "config.json").write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        app.main(_loss_cfg(tmp_path, step, tiny_token_shards))
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "block.name='normalized'" in err[0], err


def test_olmo_core_without_run_config_uses_the_model_group(oc_run, tmp_path, tiny_token_shards):
    from omegaconf import OmegaConf

    run, ref = oc_run
    step = _copy_step(run, "olmo2/step4", tmp_path)
    (step / "config.json").unlink()
    with pytest.raises(CkptEvalError, match=r"no architecture source .*model="):
        get_format("olmo_core").architecture(step)
    hf = json.loads((run / "hf_export" / "config.json").read_text())
    group = OmegaConf.create({**{k: hf[k] for k in ("model_type", "architectures", "vocab_size", "hidden_size",
                                                     "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                                     "num_key_value_heads", "rms_norm_eps", "rope_parameters")},
                              "max_position_embeddings": SEQ, "extra": {}})
    loss, source = _our_loss(step, tiny_token_shards, group)
    assert "model` group" in source and abs(loss - ref["loss"]["olmo2/step4"]) < 1e-5


# ---------------------------------------------------------------------------------------------- pickles


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_olmo_core_crafted_metadata_runs_nothing(tmp_path, tiny_token_shards, monkeypatch, capsys):
    from ckpteval import app

    marker = tmp_path / "PWNED"
    step = tmp_path / "run" / "step10"
    (step / "model_and_optim").mkdir(parents=True)
    (step / "model_and_optim" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (step / ".metadata.json").write_text("{}")
    fmt = detect_format(step)
    assert fmt is not None and fmt.name == "olmo_core"  # a trainer step dir: claimed, then refused with a reason
    with pytest.raises(CkptEvalError, match=r"refusing to unpickle .*system.*not a known checkpoint storage"):
        fmt.check_complete(step)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        app.main(_loss_cfg(tmp_path, step, tiny_token_shards))
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "refusing to unpickle" in err[0] and "system" in err[0], err
    assert not marker.exists()


def test_olmo_core_unknown_class_in_metadata_is_named_with_true_advice(oc_run, tmp_path):
    """A class of OLMo-core's module that is not its plain-data _StorageInfo is refused by name; the message says
    it is not a known storage class and points at the trainer's own exporter, not at "re-save it with the
    framework's own saver" (which is what wrote it)."""
    run, _ = oc_run
    step = _copy_step(run, "olmo2/step2", tmp_path)
    meta = step / "model_and_optim" / ".metadata"
    meta.write_bytes(meta.read_bytes().replace(b"\x8c\x0c_StorageInfo", b"\x8c\x0c_StorageXnfo"))
    with pytest.raises(CkptEvalError) as e:
        get_format("olmo_core").check_complete(step)
    text = str(e.value)
    assert "olmo_core.distributed.checkpoint.filesystem._StorageXnfo" in text
    assert "not a known checkpoint storage or metadata class" in text and "re-save it" not in text
    assert "exporter" in text


def test_olmo_core_crafted_train_state_runs_nothing(oc_run, tmp_path):
    """train/rank0.pt (read for tokens seen) goes through the allow-list too: refused, never run; the checkpoint
    still evaluates (only its tokens-seen count is unknown)."""
    run, _ = oc_run
    marker = tmp_path / "PWNED"
    step = _copy_step(run, "olmo2/step2", tmp_path)
    torch.save({"global_step": 2, "global_train_tokens_seen": _Payload(marker)}, step / "train" / "rank0.pt")
    fmt = get_format("olmo_core")
    fmt.check_complete(step)
    assert fmt.step_tokens(step) == (2, None)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- through the app


def test_olmo_core_mode_loss(oc_run, tmp_path, tiny_token_shards, monkeypatch):
    from ckpteval import app

    run, ref = oc_run
    monkeypatch.chdir(tmp_path)
    result = app.main(_loss_cfg(tmp_path, run / "olmo3/step2", tiny_token_shards))
    assert (result["step"], result["tokens_seen"]) == (2, 2 * 4 * SEQ)
    assert abs(result["eval/loss"] - ref["loss"]["olmo3/step2"]) < 1e-5, (result, ref)


def test_olmo_core_mode_convert_loads_in_stock_transformers(oc_run, tmp_path, tiny_token_shards, monkeypatch):
    from transformers import AutoModelForCausalLM

    from ckpteval import app

    run, ref = oc_run
    monkeypatch.chdir(tmp_path)
    for rel in ("olmo3/step2", "llama/step2"):
        result = app.main(factories.compose(["mode=convert", f"ckpt={run / rel}", f"convert.out={tmp_path / rel}",
                                             f"tracking.uri=sqlite:///{tmp_path}/m.db"]))
        model = AutoModelForCausalLM.from_pretrained(result["convert/out"], dtype=torch.float32).eval()
        assert abs(factories.reference_loss(model, _files(tiny_token_shards), SEQ) - ref["loss"][rel]) < 1e-5, rel


def test_olmo_core_mode_harness_fast_equals_stock_lm_eval(oc_run, tmp_path, tiny_tokenizer_dir, tiny_token_shards,
                                                          monkeypatch):
    run, ref = oc_run
    monkeypatch.chdir(tmp_path)
    framework_ckpts.assert_harness_equals_stock(run, "olmo2/step4", tmp_path, tiny_tokenizer_dir,
                                                _files(tiny_token_shards), SEQ, ref["loss"]["olmo2/step4"], step=4)


def test_olmo_core_watch_once(oc_run, tmp_path, tiny_token_shards, monkeypatch):
    run, ref = oc_run
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run / "olmo2", tmp_path / "olmo2")
    summary, losses = framework_ckpts.watch_once_losses(tmp_path / "olmo2", tiny_token_shards, SEQ, tmp_path / "m.db")
    assert summary["watch/evaluated"] == 3 and summary["watch/failed"] == 0, summary
    assert set(losses) == {"step0", "step2", "step4"}
    assert all(abs(v - ref["loss"][f"olmo2/{k}"]) < 1e-5 for k, v in losses.items()), losses


def test_olmo_core_glob_scan_cli(oc_run, tmp_path, tiny_token_shards):
    run, ref = oc_run
    for name in ("step2", "step4"):
        shutil.copytree(run / "olmo2" / name, tmp_path / "olmo2" / name)
    points = framework_ckpts.glob_scan_points(tmp_path, "olmo2/step*", tiny_token_shards, SEQ, jobs=2)
    assert set(points) == {"step2", "step4"}
    for name, (step, loss) in points.items():
        assert step == int(name[4:]) and abs(loss - ref["loss"][f"olmo2/{name}"]) < 1e-5, name


@pytest.mark.dist
def test_olmo_core_torchrun_fsdp(oc_run, tmp_path, tiny_token_shards):
    run, ref = oc_run
    loss = framework_ckpts.torchrun_loss(run / "olmo2/step4", "fsdp", tiny_token_shards, SEQ, tmp_path)
    assert abs(loss - ref["loss"]["olmo2/step4"]) < 1e-5, (loss, ref)


# ---------------------------------------------------------------------------------------------- its HF export


def test_olmo_core_hf_export_with_no_position_limit(oc_run, tmp_path, tiny_token_shards, monkeypatch):
    """OLMo-core's own HF export writes max_position_embeddings -1 ("no limit"): mode=loss at any eval.seq_len and
    mode=convert (its verification batch) work, and give OLMo-core's own loss."""
    from transformers import AutoModelForCausalLM

    from ckpteval import app

    run, ref = oc_run
    export = run / "hf_export"
    assert json.loads((export / "config.json").read_text())["max_position_embeddings"] == -1
    monkeypatch.chdir(tmp_path)
    result = app.main(_loss_cfg(tmp_path, export, tiny_token_shards))
    assert abs(result["eval/loss"] - ref["loss"]["hf_export"]) < 1e-5, result
    converted = app.main(factories.compose(["mode=convert", f"ckpt={export}", f"convert.out={tmp_path / 'hf'}",
                                            f"tracking.uri=sqlite:///{tmp_path}/m.db"]))
    model = AutoModelForCausalLM.from_pretrained(converted["convert/out"], dtype=torch.float32).eval()
    assert abs(factories.reference_loss(model, _files(tiny_token_shards), SEQ) - ref["loss"]["hf_export"]) < 1e-5

"""FSDP-sharded (HF Trainer + accelerate FSDP2) and DeepSpeed ZeRO-1/2/3 training states, written by the HF Trainer
itself under torchrun (tests/sharded_ckpts.py), evaluated without a merge step and scored against the trained
model's OWN forward at each save (float32, 1e-5); tensors checked equal to DeepSpeed's own zero_to_fp32 and
accelerate's own merge_fsdp_weights."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpteval.checkpoint import check_complete, inspect_checkpoint
from ckpteval.checkpoint.formats import detect_format, get_format
from ckpteval.errors import CkptEvalError
from tests import factories, framework_ckpts, sharded_ckpts


# The frameworks write their checkpoints under torchrun in subprocesses (module fixtures): the end-to-end tier.
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _framework():  # when a test here runs (not at collection: the default tier, which runs none, skips nothing)
    factories.require("deepspeed", "deepspeed")
    factories.require("accelerate", "harness")


SEQ = 64
TOL = 1e-5


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory, tiny_token_shards, tiny_tokenizer_dir):
    """zero{0,1,2,3}/checkpoint-{2,4} (HF Trainer + DeepSpeed, 2 ranks; ZeRO-2 tied), zero3/bare
    (engine.save_checkpoint) and {"zero1": {"checkpoint-2": loss, ...}, ...} from the engine's own forward."""
    out = tmp_path_factory.mktemp("deepspeed")
    return out, sharded_ckpts.write("deepspeed", out, tiny_token_shards, tiny_tokenizer_dir, SEQ)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_token_shards, tiny_tokenizer_dir):
    """checkpoint-{2,4}/pytorch_model_fsdp_0 (HF Trainer + FSDP2, 2 ranks), the run's config.json + tokenizer in
    the output dir, and {"checkpoint-2": loss, ...} from the FSDP module's own forward at each save."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    return out, sharded_ckpts.write("fsdp", out, tiny_token_shards, tiny_tokenizer_dir, SEQ)


def _files(shards: Path) -> list[np.ndarray]:
    return [np.fromfile(f, dtype=np.uint16) for f in sorted(Path(shards).glob("*.bin"))]


def _loss_cfg(tmp: Path, ckpt: Path, shards: Path, *extra: str):
    return factories.compose(["mode=loss", f"ckpt={ckpt}", "data=local", f"data.dataset_path={shards}",
                              f"eval.seq_len={SEQ}", "eval.batch_size=8", "eval.steps=-1",
                              f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra])


def _error_line(cfg, capsys) -> str:
    """The one `error:` line (exit 2) a job prints for `cfg`."""
    from ckpteval import app

    with pytest.raises(SystemExit) as exc:
        app.main(cfg)
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------- DeepSpeed


def test_ds_detected_complete_with_step(ds_run):
    run, _ = ds_run
    for stage in (1, 2, 3):
        for n in (2, 4):
            tag = run / f"zero{stage}" / f"checkpoint-{n}" / f"global_step{n}"
            info = inspect_checkpoint(tag)
            assert (info.format, info.path, info.step) == ("deepspeed", tag, n)
            assert info.tokenizer_path == tag.parent  # the Trainer saved it into checkpoint-N
    # ZeRO-3 checkpoint-N holds no HF weights: DeepSpeed; ZeRO-1/2 ones also hold model.safetensors: HF by default
    assert inspect_checkpoint(run / "zero3" / "checkpoint-4").path == run / "zero3/checkpoint-4/global_step4"
    assert inspect_checkpoint(run / "zero1" / "checkpoint-4").format == "hf"
    forced = inspect_checkpoint(run / "zero1" / "checkpoint-4", ckpt_format="deepspeed")
    assert (forced.format, forced.path.name, forced.step) == ("deepspeed", "global_step4", 4)
    bare = inspect_checkpoint(run / "zero3" / "bare")  # engine.save_checkpoint(dir): dir/latest -> global_step4
    assert (bare.format, bare.path, bare.step) == ("deepspeed", run / "zero3/bare/global_step4", 4)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ds_weights_equal_deepspeeds_zero_to_fp32(ds_run, stage, tmp_path_factory, tiny_token_shards):
    """Our reconstruction is tensor-for-tensor DeepSpeed's own (zero_to_fp32, run in a subprocess), and that
    model's loss (in stock transformers) is the trained model's own."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run, ref = ds_run
    theirs_dir = run / "zero_to_fp32"
    if not theirs_dir.is_dir():
        sharded_ckpts.convert("zero_to_fp32", run, theirs_dir)
    theirs = load_file(str(theirs_dir / f"zero{stage}" / "model.safetensors"))
    tag = run / f"zero{stage}" / "checkpoint-4" / "global_step4"
    fmt = get_format("deepspeed")
    ours = fmt.read_state(tag, None)
    assert set(theirs) <= set(ours) and set(ours) - set(theirs) <= {"lm_head.weight"}  # a tied head saved once
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    if stage == 2:  # tied embeddings: DeepSpeed's shared_params re-points the head
        assert ours["lm_head.weight"] is ours["model.embed_tokens.weight"]
    model = AutoModelForCausalLM.from_pretrained(theirs_dir / f"zero{stage}", dtype=torch.float32).eval()
    loss = factories.reference_loss(model, _files(tiny_token_shards), SEQ)
    assert abs(loss - ref[f"zero{stage}"]["checkpoint-4"]) < TOL


@pytest.mark.parametrize("stage,rel,extra", [
    (0, "checkpoint-4", ("ckpt_format=deepspeed",)),  # no ZeRO partitions: the model states' own weights
    (1, "checkpoint-4/global_step4", ()),
    (2, "checkpoint-2", ("ckpt_format=deepspeed",)),  # the fp32 partitions, not the Trainer's model.safetensors
])  # ZeRO-3 checkpoint-N dirs through the app: test_ds_watch_once, test_glob_scan_over_both_families, torchrun
def test_ds_mode_loss_equals_trained_model(ds_run, stage, rel, extra, tmp_path, tiny_token_shards, monkeypatch, caplog):
    from ckpteval import app

    run, ref = ds_run
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="ckpteval"):
        result = app.main(_loss_cfg(tmp_path, run / f"zero{stage}" / rel, tiny_token_shards, *extra))
    n = int(rel.split("/")[0].split("-")[1])
    assert result["step"] == n
    assert abs(result["eval/loss"] - ref[f"zero{stage}"][f"checkpoint-{n}"]) < TOL, (result, ref)
    assert (f"fp32 weights rebuilt from the ZeRO-{stage} optimizer partitions of 2 rank(s)" if stage else
            "the model states' own weights (float32) in mp_rank_00_model_states.pt") in caplog.text


def test_ds_bare_dir_needs_ckpt_config(ds_run, tmp_path, tiny_token_shards, monkeypatch, capsys):
    """engine.save_checkpoint(dir) keeps no config.json: the `model` group contradicts the tensors and the error
    names ckpt_config=; with it, the trained model's loss. A ckpt_config of another model is refused by name."""
    from ckpteval import app

    run, ref = ds_run
    monkeypatch.chdir(tmp_path)
    bare = run / "zero3" / "bare"
    line = _error_line(_loss_cfg(tmp_path, bare, tiny_token_shards), capsys)
    assert "contradicts its architecture source, the `model` group" in line and "ckpt_config=PATH" in line, line
    config = run / "zero3" / "checkpoint-4" / "config.json"
    result = app.main(_loss_cfg(tmp_path, bare, tiny_token_shards, f"ckpt_config={config}"))
    assert abs(result["eval/loss"] - ref["zero3"]["checkpoint-4"]) < TOL
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": 128}))
    line = _error_line(_loss_cfg(tmp_path, bare, tiny_token_shards, f"ckpt_config={other}"), capsys)
    assert f"ckpt_config={other}" in line and "different model" in line, line
    line = _error_line(_loss_cfg(tmp_path, bare, tiny_token_shards, f"ckpt_config={tmp_path / 'nope'}"), capsys)
    assert "is not a config.json nor a dir holding one" in line, line


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _harness_and_convert(ckpt: Path, tmp: Path, files: list, ref_loss: float, step: int) -> None:
    """mode=convert's HF dir loads in stock transformers with the trained model's loss, and mode=harness (fast
    backend) on the checkpoint equals stock lm-eval (HFLM) on that dir: accuracies exactly, perplexities as mean
    log-likelihoods to 1e-5 (a word perplexity of ~5e8 moves by 3e-6 relative with float32 sums in another order)."""
    import math

    from transformers import AutoModelForCausalLM

    ours, stock, hf_dir = framework_ckpts.harness_vs_stock(ckpt, tmp)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert abs(factories.reference_loss(model, files, SEQ) - ref_loss) < TOL
    assert stock and ours["step"] == step
    for key, value in stock.items():
        if key.endswith("perplexity"):
            assert abs(math.log(ours[key]) - math.log(value)) < TOL, (key, ours[key], value)
        else:
            assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-5), key


def test_ds_incomplete_dirs_are_refused_and_skipped(ds_run, tmp_path, tiny_token_shards, monkeypatch, capsys, caplog):
    from ckpteval.scan import expand_pattern

    run, _ = ds_run
    runs = tmp_path / "runs"
    rank = _copy(run / "zero3" / "checkpoint-4", runs / "checkpoint-4")
    (rank / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    no_latest = _copy(run / "zero3" / "checkpoint-2", runs / "checkpoint-2")
    (no_latest / "latest").unlink()
    other = _copy(run / "zero1" / "checkpoint-2", runs / "checkpoint-6")
    (other / "model.safetensors").unlink()
    (other / "latest").write_text("global_step9")
    stage12 = _copy(run / "zero1" / "checkpoint-4", runs / "checkpoint-8")
    (stage12 / "model.safetensors").unlink()
    (stage12 / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    expected = {
        rank: r"the optim states of rank 1 \(zero_pp_rank_1_mp_rank_00_optim_states.pt\) are missing; ZeRO-3 over 2",
        no_latest: r"no `latest` file naming one of its tags \(global_step2\)",
        other: r"`latest` names 'global_step9', which is not a tag dir there",
        stage12: r"the optim states of rank 1 .* ZeRO-1 over 2 rank",
    }
    for path, reason in expected.items():
        ok, why = check_complete(path)
        assert not ok and __import__("re").search(reason, why), why
    with pytest.raises(CkptEvalError, match=r"no `latest` file beside it naming global_step2"):
        get_format("deepspeed").check_complete(no_latest / "global_step2")
    bare = tmp_path / "bare"  # one save dir, two tags: `latest` names the newer one, so the older one is finished
    for n in (2, 4):
        _copy(run / "zero3" / f"checkpoint-{n}" / f"global_step{n}", bare / f"global_step{n}")
    (bare / "latest").write_text("global_step4")
    assert check_complete(bare / "global_step2") == (True, "") and check_complete(bare / "global_step4") == (True, "")
    (bare / "latest").write_text("global_step2")
    ok, why = check_complete(bare / "global_step4")
    assert not ok and "latest names 'global_step2', not 'global_step4'" in why, why
    monkeypatch.chdir(tmp_path)
    line = _error_line(_loss_cfg(tmp_path, rank, tiny_token_shards), capsys)
    assert "rank 1" in line and "missing" in line, line
    (runs / "checkpoint-10").symlink_to(run / "zero3" / "checkpoint-4", target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        assert [Path(p).name for p in expand_pattern(f"{runs}/checkpoint-*")] == ["checkpoint-10"]
    assert caplog.text.count("skipping incomplete checkpoint") == 4 and "rank 1" in caplog.text


def test_ds_crafted_pickles_run_nothing(ds_run, tmp_path, tiny_token_shards, monkeypatch, capsys):
    """A payload in *_model_states.pt or *_optim_states.pt: detection, loss, scans and the watcher refuse it by
    name; nothing of it ever runs."""
    from ckpteval import app
    from ckpteval.scan import expand_pattern

    run, _ = ds_run
    marker = tmp_path / "PWNED"
    watch = tmp_path / "watch"
    model = _copy(run / "zero3" / "checkpoint-2", watch / "checkpoint-2")
    torch.save({"module": _Payload(marker)}, model / "global_step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    optim = _copy(run / "zero3" / "checkpoint-4", watch / "checkpoint-4")
    torch.save({"optimizer_state_dict": _Payload(marker)},
               optim / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    ok, why = check_complete(model)
    assert not ok and "refusing to unpickle" in why and "system" in why, why
    monkeypatch.chdir(tmp_path)
    for ckpt in (model, optim):
        line = _error_line(_loss_cfg(tmp_path, ckpt, tiny_token_shards), capsys)
        assert "refusing to unpickle" in line and "system" in line, line
    assert [Path(p).name for p in expand_pattern(f"{watch}/checkpoint-*")] == ["checkpoint-4"]  # model one skipped
    summary = app.main(factories.compose([
        "mode=watch", f"watch.dir={watch}", "watch.once=true", "watch.stable_s=0", "watch.max_attempts=1",
        "data=local", f"data.dataset_path={tiny_token_shards}", f"eval.seq_len={SEQ}", "eval.steps=1",
        f"tracking.uri=sqlite:///{tmp_path}/w.db"]))
    assert summary["watch/evaluated"] == 0 and summary["watch/failed"] == 1, summary
    assert not marker.exists()


def test_ds_watch_once(ds_run, tmp_path, tiny_token_shards, monkeypatch):
    run, ref = ds_run
    monkeypatch.chdir(tmp_path)
    watch = tmp_path / "out"
    for n in (2, 4):
        _copy(run / "zero3" / f"checkpoint-{n}", watch / f"checkpoint-{n}")
    summary, losses = framework_ckpts.watch_once_losses(watch, tiny_token_shards, SEQ, tmp_path / "m.db")
    assert summary["watch/evaluated"] == 2 and summary["watch/failed"] == 0, summary
    assert set(losses) == {"checkpoint-2", "checkpoint-4"}
    assert all(abs(v - ref["zero3"][k]) < TOL for k, v in losses.items()), (losses, ref)


def test_ds_mode_harness_and_convert(ds_run, tmp_path, tiny_token_shards, monkeypatch):
    """mode=convert writes an HF dir stock transformers loads (the trained model's loss), and mode=harness (fast
    backend) on the ZeRO-3 checkpoint equals stock lm-eval on that dir."""
    run, ref = ds_run
    monkeypatch.chdir(tmp_path)
    ckpt = _copy(run / "zero3" / "checkpoint-4", tmp_path / "run" / "checkpoint-4")  # with its tokenizer
    _harness_and_convert(ckpt, tmp_path, _files(tiny_token_shards), ref["zero3"]["checkpoint-4"], step=4)


@pytest.mark.dist
def test_ds_torchrun_fsdp(ds_run, tmp_path, tiny_token_shards):
    run, ref = ds_run
    loss = framework_ckpts.torchrun_loss(run / "zero3" / "checkpoint-4", "fsdp", tiny_token_shards, SEQ, tmp_path)
    assert abs(loss - ref["zero3"]["checkpoint-4"]) < TOL, (loss, ref)


# ---------------------------------------------------------------------------------------------- FSDP


def test_fsdp_detected_with_run_config(fsdp_run):
    run, _ = fsdp_run
    for n in (2, 4):
        inner = run / f"checkpoint-{n}" / "pytorch_model_fsdp_0"
        for path in (run / f"checkpoint-{n}", inner):
            info = inspect_checkpoint(path)
            assert (info.format, info.path, info.step, info.dcp_prefix) == ("fsdp", inner, n, "model.")
            assert info.tokenizer_path == run  # the run's output dir: the Trainer saves none into checkpoint-N
    arch = get_format("fsdp").architecture(inner)
    assert arch.source == f"config.json in {run}"
    assert detect_format(run / "checkpoint-4" / "optimizer_0").name == "dcp"  # not claimed as a model


def test_fsdp_weights_equal_accelerates_merge(fsdp_run, tmp_path, tiny_token_shards, monkeypatch):
    """Our read is tensor-for-tensor accelerate's own merge_fsdp_weights (in a subprocess), whose model (stock
    transformers) has the trained model's loss; only the model's tensors are asked for."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ckpteval.checkpoint.formats import fsdp as fsdp_fmt

    run, ref = fsdp_run
    inner = run / "checkpoint-4" / "pytorch_model_fsdp_0"
    merged = sharded_ckpts.convert("merge_fsdp", inner, tmp_path / "merged")
    theirs = load_file(str(merged / "model.safetensors"))
    ours = get_format("fsdp").read_state(inner, None)
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    shutil.copy(run / "config.json", merged / "config.json")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert abs(factories.reference_loss(model, _files(tiny_token_shards), SEQ) - ref["checkpoint-4"]) < TOL
    asked: list[str] = []
    real = fsdp_fmt.read_dcp_tensors
    monkeypatch.setattr(fsdp_fmt, "read_dcp_tensors", lambda p, wanted: (asked.extend(wanted), real(p, wanted))[1])
    get_format("fsdp").read_state(inner, None)
    assert sorted(asked) == sorted("model." + name for name in ours)  # model tensors only


def test_fsdp_mode_loss_on_the_dcp_dir_itself(fsdp_run, tmp_path, tiny_token_shards, monkeypatch):
    """Pointed at pytorch_model_fsdp_0 (checkpoint-N dirs through the app: the watch, scan and torchrun tests)."""
    from ckpteval import app

    run, ref = fsdp_run
    monkeypatch.chdir(tmp_path)
    result = app.main(_loss_cfg(tmp_path, run / "checkpoint-4" / "pytorch_model_fsdp_0", tiny_token_shards))
    assert result["step"] == 4 and result["tokens_seen"] is None  # the Trainer did not count input tokens
    assert abs(result["eval/loss"] - ref["checkpoint-4"]) < TOL, (result, ref)


def test_fsdp_without_run_config_names_ckpt_config(fsdp_run, tmp_path, tiny_token_shards, monkeypatch, capsys):
    """A checkpoint-N copied away from its run: the `model` group contradicts it and the error names ckpt_config=;
    ckpt_config= as a file or as the dir holding it gives the trained model's loss."""
    from ckpteval import app

    run, ref = fsdp_run
    monkeypatch.chdir(tmp_path)
    alone = _copy(run / "checkpoint-4", tmp_path / "copy" / "checkpoint-4")
    line = _error_line(_loss_cfg(tmp_path, alone, tiny_token_shards), capsys)
    assert "the `model` group" in line and "ckpt_config=PATH" in line, line
    for given in (run / "config.json", run):
        result = app.main(_loss_cfg(tmp_path, alone, tiny_token_shards, f"ckpt_config={given}",
                                    f"tokenizer={run}"))
        assert abs(result["eval/loss"] - ref["checkpoint-4"]) < TOL and result["step"] == 4


def test_fsdp_wrapper_fragments_in_names(fsdp_run, tmp_path, tiny_token_shards):
    """FSDP1 / torch.compile saves can keep `_fsdp_wrapped_module.` / `_orig_mod.` in their names: the same
    tensors (accelerate-written, read back) re-saved under such names read the same (whole, then laid out)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    from ckpteval.checkpoint.formats._dcp import read_dcp_metadata, read_dcp_tensors

    run, ref = fsdp_run
    inner = run / "checkpoint-4" / "pytorch_model_fsdp_0"
    meta = read_dcp_metadata(inner).state_dict_metadata
    tensors = read_dcp_tensors(inner, dict(meta))

    def wrapped(key: str) -> str:  # model.model.layers.0.self_attn... -> model._orig_mod.model.layers.0._fsdp_wr...
        parts = key[len("model."):].split(".")
        if parts[:2] == ["model", "layers"]:
            parts.insert(3, "_fsdp_wrapped_module")
        return "model._orig_mod." + ".".join(parts)

    dest = tmp_path / "run" / "checkpoint-4" / "pytorch_model_fsdp_0"
    dcp.save({"model": {wrapped(k)[len("model."):]: v for k, v in tensors.items()}}, checkpoint_id=str(dest),
             no_dist=True)
    shutil.copy(run / "config.json", tmp_path / "run" / "config.json")
    assert any("_fsdp_wrapped_module" in k for k in read_dcp_metadata(dest).state_dict_metadata)
    fmt = get_format("fsdp")
    assert fmt.sharded_dcp_prefix(dest) is None  # read whole, renamed, then laid out
    arch = fmt.architecture(dest)
    model = AutoModelForCausalLM.from_config(arch.config)
    model.load_state_dict(fmt.read_state(dest, arch.config))
    assert abs(factories.reference_loss(model.eval(), _files(tiny_token_shards), SEQ) - ref["checkpoint-4"]) < TOL


def test_fsdp_incomplete_dirs_are_refused_and_skipped(fsdp_run, tmp_path, caplog):
    from ckpteval.scan import expand_pattern

    run, _ = fsdp_run
    ckpt = _copy(run / "checkpoint-4", tmp_path / "run" / "checkpoint-4")
    inner = ckpt / "pytorch_model_fsdp_0"
    distcp = next(inner.glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:100])
    ok, why = check_complete(ckpt)
    assert not ok and "truncated" in why, why
    (inner / ".metadata").unlink()
    ok, why = check_complete(ckpt)
    assert not ok and "no .metadata" in why and "ckpt_format=fsdp" in why, why
    per_rank = tmp_path / "run" / "checkpoint-6"
    per_rank.mkdir()
    (per_rank / "pytorch_model_fsdp_0_rank0.bin").write_bytes(b"\0" * 8)
    ok, why = check_complete(per_rank)
    assert not ok and "use_dcp=True" in why, why
    _copy(run / "checkpoint-2", tmp_path / "run" / "checkpoint-2")
    shutil.copy(run / "config.json", tmp_path / "run" / "config.json")
    with caplog.at_level(logging.WARNING):
        assert [Path(p).name for p in expand_pattern(f"{tmp_path}/run/checkpoint-*")] == ["checkpoint-2"]
    assert caplog.text.count("skipping incomplete checkpoint") == 2 and "no .metadata" in caplog.text


def test_fsdp_crafted_metadata_runs_nothing(tmp_path, tiny_token_shards, monkeypatch, capsys):
    marker = tmp_path / "PWNED"
    inner = tmp_path / "run" / "checkpoint-4" / "pytorch_model_fsdp_0"
    inner.mkdir(parents=True)
    (inner / "__0_0.distcp").write_bytes(b"\0" * 16)
    (inner / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    assert detect_format(inner.parent).name == "fsdp"
    ok, why = check_complete(inner.parent)
    assert not ok and "refusing to unpickle" in why and "system" in why, why
    monkeypatch.chdir(tmp_path)
    line = _error_line(_loss_cfg(tmp_path, inner.parent, tiny_token_shards), capsys)
    assert "refusing to unpickle" in line and "system" in line, line
    assert not marker.exists()


def test_fsdp_watch_once(fsdp_run, tmp_path, tiny_token_shards, monkeypatch):
    run, ref = fsdp_run
    monkeypatch.chdir(tmp_path)
    watch = _copy(run, tmp_path / "out")
    summary, losses = framework_ckpts.watch_once_losses(watch, tiny_token_shards, SEQ, tmp_path / "m.db")
    assert summary["watch/evaluated"] == 2 and summary["watch/failed"] == 0, summary
    assert set(losses) == {"checkpoint-2", "checkpoint-4"}
    assert all(abs(v - ref[k]) < TOL for k, v in losses.items()), (losses, ref)


def test_fsdp_mode_harness_and_convert(fsdp_run, tmp_path, tiny_token_shards, monkeypatch):
    run, ref = fsdp_run
    monkeypatch.chdir(tmp_path)
    root = _copy(run, tmp_path / "run")  # the tokenizer is in the run's output dir, not in checkpoint-N
    _harness_and_convert(root / "checkpoint-4", tmp_path, _files(tiny_token_shards), ref["checkpoint-4"], step=4)


@pytest.mark.dist
def test_fsdp_torchrun_reads_its_own_shards(fsdp_run, tmp_path, tiny_token_shards):
    run, ref = fsdp_run
    loss = framework_ckpts.torchrun_loss(run / "checkpoint-4", "fsdp", tiny_token_shards, SEQ, tmp_path)
    assert abs(loss - ref["checkpoint-4"]) < TOL, (loss, ref)


# ---------------------------------------------------------------------------------------------- both, one scan


def test_glob_scan_over_both_families(ds_run, fsdp_run, tmp_path, tiny_token_shards):
    """`python run.py -m mode=loss ckpt='glob:runs/*/checkpoint-*'` over the FSDP run and the ZeRO-3 run: one
    child run per checkpoint, each at its step with the trained model's loss."""
    (ds, ds_ref), (fsdp, fsdp_ref) = ds_run, fsdp_run
    _copy(fsdp, tmp_path / "runs" / "fsdp")
    _copy(ds / "zero3", tmp_path / "runs" / "zero3")
    db = tmp_path / "mlflow.db"
    proc = factories.run_cli(["-m", "mode=loss", "ckpt=glob:runs/*/checkpoint-*", "data=local",
                              f"data.dataset_path={tiny_token_shards}", f"eval.seq_len={SEQ}", "eval.batch_size=8",
                              "eval.steps=-1", f"tracking.uri=sqlite:///{db}", "hydra.sweep.dir=sweep"],
                             cwd=tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    client, runs = factories.mlflow_runs(db)
    points = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId"):
            [point] = client.get_metric_history(r.info.run_id, "eval/loss")
            ckpt = Path(r.data.tags["ckpt"])
            points[f"{ckpt.parent.name}/{ckpt.name}"] = (point.step, point.value)
    expected = {f"fsdp/checkpoint-{n}": fsdp_ref[f"checkpoint-{n}"] for n in (2, 4)}
    expected.update({f"zero3/checkpoint-{n}": ds_ref["zero3"][f"checkpoint-{n}"] for n in (2, 4)})
    assert set(points) == set(expected), points
    for key, (step, loss) in points.items():
        assert step == int(key.rsplit("-", 1)[1]) and abs(loss - expected[key]) < TOL, (key, loss, expected[key])

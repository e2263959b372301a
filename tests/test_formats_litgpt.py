"""litgpt checkpoints written by litgpt's own `pretrain` loop (tests/framework_ckpts.py: a Llama-family and a
Pythia / GPT-NeoX run, step-00000002, step-00000004 and final each), read by the litgpt family and scored against
litgpt's OWN GPT forward on each saved lit_model.pth (float32, 1e-5)."""

from __future__ import annotations

import functools
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ckpteval.checkpoint.formats import detect_format, get_format
from ckpteval.checkpoint.formats import litgpt as lit_fmt
from ckpteval.errors import CkptEvalError
from tests import factories, framework_ckpts

# The framework writes its checkpoints in a subprocess (module fixture): the end-to-end tier, not the fast one.
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _framework():  # when a test here runs (not at collection: the default tier, which runs none, skips nothing)
    factories.require("litgpt", "litgpt")


SEQ = 64
_files = factories.shard_arrays
_our_loss = functools.partial(factories.family_loss, seq_len=SEQ)
_loss_cfg = functools.partial(factories.loss_cfg, seq_len=SEQ)
STEPS = ["llama/step-00000002", "llama/step-00000004", "llama/final", "pythia/step-00000002", "pythia/final"]


@pytest.fixture(scope="module")
def lit_run(tmp_path_factory, tiny_token_shards, tiny_tokenizer_dir):
    """llama/ and pythia/ out dirs of `litgpt pretrain` (step-00000002, step-00000004, final, logs/)."""
    out = tmp_path_factory.mktemp("litgpt") / "out"
    ref = framework_ckpts.run("litgpt", out, tiny_token_shards, SEQ, "--tokenizer", str(tiny_tokenizer_dir))
    return out, ref


def _copy_step(run: Path, rel: str, dest: Path) -> Path:
    shutil.copytree(run / rel, dest / rel)
    return dest / rel


def _edit_config(step: Path, **fields) -> None:
    cfg = yaml.safe_load((step / "model_config.yaml").read_text())
    cfg.update(fields)
    (step / "model_config.yaml").write_text(yaml.safe_dump(cfg))


# ---------------------------------------------------------------------------------------------- the family


def test_litgpt_dir_file_and_final_detected_complete_with_step_and_tokens(lit_run):
    run, _ = lit_run
    step = run / "llama/step-00000004"
    for path in (step, step / "lit_model.pth", run / "llama/final"):
        fmt = detect_format(path)
        assert fmt is not None and fmt.name == "litgpt", path
        fmt.check_complete(fmt.resolve(path))
        # step_count in the pickle; iter_num x micro_batch_size x max_seq_length x devices from hyperparameters.yaml
        assert fmt.step_tokens(fmt.resolve(path)) == (4, 4 * 4 * SEQ), path
    assert get_format("litgpt").step_tokens(run / "llama/step-00000002") == (2, 2 * 4 * SEQ)


@pytest.mark.parametrize("rel", STEPS)
def test_litgpt_loss_equals_litgpt_forward(lit_run, rel, tiny_token_shards):
    run, ref = lit_run
    loss, source = _our_loss(run / rel, tiny_token_shards)
    assert "model_config.yaml" in source
    assert abs(loss - ref["loss"][rel]) < 1e-5, (rel, loss, ref["loss"][rel])


def test_litgpt_maps_onto_llama_and_gpt_neox(lit_run):
    run, _ = lit_run
    fmt = get_format("litgpt")
    assert fmt.architecture(run / "llama/final").config.model_type == "llama"
    neox = fmt.architecture(run / "pythia/final").config
    assert neox.model_type == "gpt_neox" and neox.rope_parameters["partial_rotary_factor"] == 0.25


def test_litgpt_wrong_qkv_layouts_are_detectably_wrong(lit_run, tiny_token_shards, monkeypatch):
    """Reading today's [all q, all k, all v] rows as the legacy per-group interleave (Llama), or handing them to
    GPT-NeoX without the per-head reassembly: both run, both score a different function."""
    run, ref = lit_run
    monkeypatch.setattr(lit_fmt, "_split_qkv", lambda w, c, real=lit_fmt._split_qkv:
                        real(lit_fmt._deinterleave_groups(w, c), c))
    loss, _ = _our_loss(run / "llama/final", tiny_token_shards)
    assert abs(loss - ref["loss"]["llama/final"]) > 1e-4, loss
    monkeypatch.undo()
    monkeypatch.setattr(lit_fmt, "_per_head_qkv", lambda w, c: w)
    loss, _ = _our_loss(run / "pythia/final", tiny_token_shards)
    assert abs(loss - ref["loss"]["pythia/final"]) > 1e-4, loss


def test_litgpt_legacy_interleaved_qkv(lit_run, tmp_path, tiny_token_shards):
    """litgpt < 0.5.4 saved `attn.attn` with rows interleaved per query group; litgpt's own loader de-interleaves
    them (GPT._load_from_state_dict): the same checkpoint re-laid that way gives litgpt's loss, read by us."""
    from litgpt import GPT, Config

    run, ref = lit_run
    step = _copy_step(run, "llama/final", tmp_path)
    data = torch.load(step / "lit_model.pth", weights_only=True)
    cfg = Config.from_file(step / "model_config.yaml")
    hs, g = cfg.head_size, cfg.n_query_groups
    q_per_kv = cfg.n_head // g
    legacy = {}
    for key, t in data["model"].items():
        if key.endswith("attn.qkv.weight"):
            q, k, v = t.split((cfg.n_head * hs, g * hs, g * hs))
            t = torch.cat([torch.cat((q[i * q_per_kv * hs:(i + 1) * q_per_kv * hs], k[i * hs:(i + 1) * hs],
                                      v[i * hs:(i + 1) * hs])) for i in range(g)])
            key = key.replace("attn.qkv.", "attn.attn.")
        legacy[key] = t
    torch.save({**data, "model": legacy}, step / "lit_model.pth")
    model = GPT(cfg)
    model.load_state_dict(dict(legacy))  # litgpt's own legacy path
    w = framework_ckpts.windows(tiny_token_shards, SEQ)
    with torch.no_grad():
        theirs = framework_ckpts.mean_loss(model.eval()(w[:, :-1]), w[:, 1:])
    assert abs(theirs - ref["loss"]["llama/final"]) < 1e-5
    loss, _ = _our_loss(step, tiny_token_shards)
    assert abs(loss - theirs) < 1e-5, (loss, theirs)


def test_litgpt_llama3_rope_adjustment_equals_litgpt_forward(tmp_path):
    """rope_adjustments (Llama 3.x) map onto transformers' llama3 RoPE: litgpt's GPT with its own config, saved the
    way litgpt saves (save_config + {"model": state_dict}), against our mapping's logits."""
    from litgpt import GPT, Config
    from litgpt.utils import save_config
    from transformers import AutoModelForCausalLM

    fields = dict(framework_ckpts.LIT_CONFIGS["llama"], block_size=256,
                  rope_adjustments={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_seq_len": 32})
    torch.manual_seed(0)
    model = GPT(Config(**fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    step = tmp_path / "step-00000001"
    step.mkdir()
    save_config(model.config, step)
    torch.save({"model": model.state_dict()}, step / "lit_model.pth")
    fmt = get_format("litgpt")
    arch = fmt.architecture(step)
    assert arch.config.rope_parameters["rope_type"] == "llama3"
    hf = AutoModelForCausalLM.from_config(arch.config)
    hf.load_state_dict(fmt.read_state(step, arch.config))
    ids = torch.randint(0, 512, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf.eval()(ids).logits - model(ids)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize(("fields", "named"), [
    ({"norm_qk": True}, "norm_qk=True"),
    ({"mlp_class_name": "LLaMAMoE", "n_expert": 4}, "mlp_class_name='LLaMAMoE'"),
    ({"sliding_window_size": 16}, "sliding_window_size=16"),
    ({"name": "Gemma-2b-tiny"}, "Gemma"),
    ({"rope_adjustments": {"factor": 2.0, "beta_fast": 32, "beta_slow": 1, "original_max_seq_len": 64}},
     "rope_adjustments"),
])
def test_litgpt_unsupported_config_is_refused_by_name(lit_run, tmp_path, fields, named):
    run, _ = lit_run
    step = _copy_step(run, "llama/final", tmp_path)
    _edit_config(step, **fields)
    with pytest.raises(CkptEvalError, match=r"describes a model with .*no transformers counterpart.*convert_from_litgpt")\
            as e:
        get_format("litgpt").architecture(step)
    assert named in str(e.value)


def test_litgpt_lora_weights_are_refused_by_name(lit_run, tmp_path):
    run, _ = lit_run
    step = _copy_step(run, "llama/final", tmp_path)
    data = torch.load(step / "lit_model.pth", weights_only=True)
    data["model"]["transformer.h.0.attn.qkv.lora_A"] = torch.zeros(4, 64)
    torch.save(data, step / "lit_model.pth")
    with pytest.raises(CkptEvalError, match=r"LoRA weights .*lora_A.*merge_lora"):
        get_format("litgpt").architecture(step)


def test_litgpt_incomplete_dir_is_refused(lit_run, tmp_path):
    run, _ = lit_run
    step = _copy_step(run, "llama/final", tmp_path)
    (step / "model_config.yaml").unlink()  # litgpt writes it after lit_model.pth
    assert detect_format(step).name == "litgpt"
    with pytest.raises(CkptEvalError, match=r"model_config\.yaml is missing .*still being written"):
        get_format("litgpt").check_complete(step)
    shutil.copy(run / "llama/final/model_config.yaml", step)
    pth = step / "lit_model.pth"
    pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(CkptEvalError, match=r"truncated, corrupt"):
        get_format("litgpt").check_complete(step)


# ---------------------------------------------------------------------------------------------- pickles


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["model", "extra"])
def test_litgpt_crafted_lit_model_runs_nothing(lit_run, tmp_path, tiny_token_shards, monkeypatch, capsys, where):
    from ckpteval import app

    run, _ = lit_run
    marker = tmp_path / "PWNED"
    step = _copy_step(run, "llama/final", tmp_path)
    data = torch.load(step / "lit_model.pth", weights_only=True)
    if where == "model":
        data = _Payload(marker)
    else:  # beside the weights, where the optimizer / dataloader state sits
        data["train_dataloader"] = _Payload(marker)
    with open(step / "lit_model.pth", "wb") as f:
        if where == "model":
            pickle.dump(data, f)  # a plain (non-zip) pickle
        else:
            torch.save(data, f)
    assert detect_format(step).name == "litgpt"
    # the zip pickle names os.system: refused before unpickling; a legacy (non-zip) pickle is not memory-mappable
    # and is refused as unreadable before the weights-only unpickler would even see it
    expected = "refusing to unpickle" if where == "extra" else "not a readable torch file"
    with pytest.raises(CkptEvalError, match=expected):
        get_format("litgpt").check_complete(step)
    if where == "model":
        assert not marker.exists()
        return
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        app.main(_loss_cfg(tmp_path, step, tiny_token_shards))
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err
    assert not marker.exists()


def test_litgpt_yaml_is_read_safely(lit_run, tmp_path):
    """model_config.yaml goes through yaml.safe_load: a python/object tag is an error, never a call."""
    run, _ = lit_run
    marker = tmp_path / "PWNED"
    step = _copy_step(run, "llama/final", tmp_path)
    (step / "model_config.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(CkptEvalError, match=r"model_config\.yaml is unreadable or not plain YAML"):
        get_format("litgpt").check_complete(step)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- through the app


def test_litgpt_mode_loss_on_the_file(lit_run, tmp_path, tiny_token_shards, monkeypatch):
    from ckpteval import app

    run, ref = lit_run
    monkeypatch.chdir(tmp_path)
    result = app.main(_loss_cfg(tmp_path, run / "pythia/step-00000004/lit_model.pth", tiny_token_shards))
    assert (result["step"], result["tokens_seen"]) == (4, 4 * 4 * SEQ)
    assert abs(result["eval/loss"] - ref["loss"]["pythia/step-00000004"]) < 1e-5, (result, ref)


def test_litgpt_mode_convert_loads_in_stock_transformers(lit_run, tmp_path, tiny_token_shards, monkeypatch):
    """GPT-NeoX here; the Llama family goes through mode=convert in the harness test below."""
    from transformers import AutoModelForCausalLM

    from ckpteval import app

    run, ref = lit_run
    monkeypatch.chdir(tmp_path)
    for rel in ("pythia/final",):
        result = app.main(factories.compose(["mode=convert", f"ckpt={run / rel}", f"convert.out={tmp_path / rel}",
                                             f"tracking.uri=sqlite:///{tmp_path}/m.db"]))
        out = Path(result["convert/out"])
        assert (out / "tokenizer.json").is_file()  # the tokenizer litgpt copied into the step dir
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert abs(factories.reference_loss(model, _files(tiny_token_shards), SEQ) - ref["loss"][rel]) < 1e-5, rel


def test_litgpt_mode_harness_fast_equals_stock_lm_eval(lit_run, tmp_path, tiny_tokenizer_dir, tiny_token_shards,
                                                       monkeypatch):
    run, ref = lit_run
    monkeypatch.chdir(tmp_path)
    framework_ckpts.assert_harness_equals_stock(run, "llama/step-00000004", tmp_path, tiny_tokenizer_dir,
                                                _files(tiny_token_shards), SEQ, ref["loss"]["llama/step-00000004"],
                                                step=4)


def test_litgpt_watch_once(lit_run, tmp_path, tiny_token_shards, monkeypatch):
    """The watcher over litgpt's out dir: the step-N dirs are evaluated; `final` and `logs` carry no step and are
    left alone."""
    run, ref = lit_run
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run / "llama", tmp_path / "llama")
    summary, losses = framework_ckpts.watch_once_losses(tmp_path / "llama", tiny_token_shards, SEQ, tmp_path / "m.db")
    assert summary["watch/evaluated"] == 2 and summary["watch/failed"] == 0, summary
    assert set(losses) == {"step-00000002", "step-00000004"}
    assert all(abs(v - ref["loss"][f"llama/{k}"]) < 1e-5 for k, v in losses.items()), losses


def test_litgpt_glob_scan_cli(lit_run, tmp_path, tiny_token_shards):
    run, ref = lit_run
    shutil.copytree(run / "llama", tmp_path / "out" / "pretrain" / "llama")
    points = framework_ckpts.glob_scan_points(tmp_path, "out/pretrain/*/step-*", tiny_token_shards, SEQ, jobs=2)
    assert set(points) == {"step-00000002", "step-00000004"}
    for name, (step, loss) in points.items():
        assert step == int(name.split("-")[1]) and abs(loss - ref["loss"][f"llama/{name}"]) < 1e-5, name

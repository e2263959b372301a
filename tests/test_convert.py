"""`mode=convert`: DCP -> HF dir round trip (logits within 1e-5 of the model that was saved), a no-op re-run,
re-conversion after the checkpoint changes, bfloat16 storage, and the refusals (foreign dir, tolerance)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ckpteval import app
from tests import factories


def make_dcp_checkpoint(root: Path, tokenizer_dir: Path, step: int = 40, seed: int = 0, **kw) -> tuple[Path, object]:
    """A trainer-style DCP checkpoint {"model": ..., "optim": ...} with config.json + tokenizer beside the shards,
    written with torch.distributed.checkpoint directly; returns (dir, the model that was saved)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoTokenizer

    model = factories.make_model(seed=seed, **kw)
    ckpt = Path(root) / f"step_{step}"
    state = {"model": model.state_dict(),
             "optim": {"state": {"exp_avg": torch.ones(3)}, "param_groups": {"lr": torch.tensor(1e-3)}}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(ckpt)), no_dist=True)
    model.config.save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(ckpt)
    return ckpt, model


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _convert(tmp: Path, ckpt: Path, out: Path, *extra: str) -> dict:
    return app.main(factories.compose(["mode=convert", f"ckpt={ckpt}", f"convert.out={out}",
                                       f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra]))


def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch).logits.float()


def _batch(vocab: int = factories.VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 40), generator=torch.Generator().manual_seed(5))


def _mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


def test_dcp_round_trip_noop_and_reconvert(in_tmp, tiny_tokenizer_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, saved = make_dcp_checkpoint(in_tmp / "run", tiny_tokenizer_dir)
    out = in_tmp / "exports" / "step_40"
    result = _convert(in_tmp, ckpt, out)
    stdout = capsys.readouterr().out
    assert "max abs logits diff" in stdout
    assert result["step"] == 40 and result["convert/reused"] == 0 and result["convert/max_abs_diff"] <= 1e-5

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "ckpteval_source.json"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging/partial dirs left
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    batch = _batch()
    assert (_logits(converted, batch) - _logits(saved, batch)).abs().max().item() <= 1e-5
    text = "A checkpoint is a snapshot of the weights."
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(tiny_tokenizer_dir)(text)["input_ids"]

    before = _mtimes(out)
    again = _convert(in_tmp, ckpt, out)
    assert again["convert/reused"] == 1
    assert "already converted" in capsys.readouterr().out
    assert _mtimes(out) == before  # nothing rewritten

    st = (ckpt / "__0_0.distcp").stat()  # the checkpoint is rewritten in place: its identity changes
    os.utime(ckpt / "__0_0.distcp", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = _convert(in_tmp, ckpt, out)
    assert third["convert/reused"] == 0

    _, runs = factories.mlflow_runs(in_tmp / "mlflow.db")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["mode"] == "convert" and r.data.tags["step"] == "40" for r in runs)


def test_bfloat16_storage_and_default_output(in_tmp, tiny_tokenizer_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    ckpt, _ = make_dcp_checkpoint(in_tmp / "run", tiny_tokenizer_dir, step=7)
    result = app.main(factories.compose(["mode=convert", f"ckpt={ckpt}", "convert.dtype=bfloat16",
                                         f"tracking.uri=sqlite:///{in_tmp}/mlflow.db"]))
    out = Path(result["convert/out"])
    # default: under outputs/converted, never beside the checkpoint (where scans would take it for a step)
    assert out.resolve().parent == (in_tmp / "outputs" / "converted").resolve() and out.name.startswith("step_7-")
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step_7"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    # The stored model is the source rounded to bfloat16: reference = saved weights rounded the same way.
    rounded = factories.make_model(seed=0)
    with torch.no_grad():
        for param in rounded.parameters():  # weights only: rotary buffers are recomputed in float32 on load
            param.copy_(param.to(torch.bfloat16).float())
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    batch = _batch()
    assert (_logits(converted, batch) - _logits(rounded, batch)).abs().max().item() <= 1e-5
    assert json.loads((out / "ckpteval_source.json").read_text())["dtype"] == "bfloat16"


def _expect_error(cfg, match: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        app.main(cfg)
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], errors


def test_refuses_a_dir_it_did_not_write(in_tmp, tiny_tokenizer_dir, capsys):
    ckpt, _ = make_dcp_checkpoint(in_tmp / "run", tiny_tokenizer_dir)
    out = in_tmp / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _expect_error(factories.compose(["mode=convert", f"ckpt={ckpt}", f"convert.out={out}", "tracking.enabled=false"]),
                  "not written by mode=convert",
                  capsys)
    assert (out / "notes.txt").read_text() == "keep me"


def test_logits_beyond_tolerance_publish_nothing(in_tmp, tiny_tokenizer_dir, capsys, monkeypatch):
    from ckpteval.checkpoint import convert

    ckpt, _ = make_dcp_checkpoint(in_tmp / "run", tiny_tokenizer_dir)
    monkeypatch.setattr(convert, "_verify", lambda *a, **k: 0.5)  # a conversion that changed the model
    out = in_tmp / "exports" / "step_40"
    _expect_error(factories.compose(["mode=convert", f"ckpt={ckpt}", f"convert.out={out}",
                                     f"tracking.uri=sqlite:///{in_tmp}/mlflow.db"]), "convert.tolerance", capsys)
    assert not out.exists() and not list((in_tmp / "exports").iterdir())
    _, runs = factories.mlflow_runs(in_tmp / "mlflow.db")
    assert [r.info.status for r in runs] == ["FAILED"]

"""`mode=loss` end to end: numbers against the plain transformers reference, MLflow read back, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpteval import app
from tests import factories

SEQ = 32


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _loss_cfg(tmp: Path, ckpt: Path, *extra: str):
    return factories.compose(["mode=loss", f"ckpt={ckpt}", f"eval.seq_len={SEQ}", "eval.batch_size=4",
                              f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra])


def _shards(path: Path) -> list[np.ndarray]:
    return [np.fromfile(f, dtype=np.uint16) for f in sorted(path.glob("*.bin"))]


def _model(ckpt: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def test_local_one_pass_matches_reference(in_tmp, tiny_hf_ckpt, tiny_token_shards):
    cfg = _loss_cfg(in_tmp, tiny_hf_ckpt, "data=local", f"data.dataset_path={tiny_token_shards}", "eval.steps=-1")
    result = app.main(cfg)
    arrays = _shards(tiny_token_shards)
    n_windows = sum((len(a) - 1) // SEQ for a in arrays)
    ref = factories.reference_loss(_model(tiny_hf_ckpt), arrays, SEQ)
    assert result["eval/tokens"] == n_windows * SEQ
    assert abs(result["eval/loss"] - ref) < 1e-5
    assert result["eval/perplexity"] == pytest.approx(np.exp(ref), rel=1e-5)
    assert result["step"] == 120
    saved = json.loads((in_tmp / "results.json").read_text())
    assert saved["eval/loss"] == result["eval/loss"]


def test_local_wraps_around(in_tmp, tiny_hf_ckpt, tiny_token_shards):
    steps, batch = 20, 4  # 80 windows requested, fewer exist: the order wraps to window 0
    cfg = _loss_cfg(in_tmp, tiny_hf_ckpt, "data=local", f"data.dataset_path={tiny_token_shards}",
                    f"eval.steps={steps}")
    result = app.main(cfg)
    arrays = _shards(tiny_token_shards)
    n_windows = sum((len(a) - 1) // SEQ for a in arrays)
    assert n_windows < steps * batch
    ids = [i % n_windows for i in range(steps * batch)]
    ref = factories.reference_loss(_model(tiny_hf_ckpt), arrays, SEQ, window_ids=ids)
    assert result["eval/tokens"] == steps * batch * SEQ
    assert abs(result["eval/loss"] - ref) < 1e-5


def test_npy_and_uint32_shards(in_tmp, tiny_hf_ckpt):
    data = in_tmp / "npy"
    data.mkdir()
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 512, size=n).astype(np.uint32) for n in (300, 200)]
    for i, a in enumerate(arrays):
        np.save(data / f"part_{i}.npy", a)
    cfg = _loss_cfg(in_tmp, tiny_hf_ckpt, "data=local", f"data.dataset_path={data}", "data.file_pattern=*.npy",
                    "eval.steps=-1")
    result = app.main(cfg)
    assert abs(result["eval/loss"] - factories.reference_loss(_model(tiny_hf_ckpt), arrays, SEQ)) < 1e-5


def test_hf_dataset_matches_reference(in_tmp, tiny_hf_ckpt):
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    docs = [f"Document number {i}: " + " ".join(factories.TEXT[i % len(factories.TEXT)] for _ in range(3))
            for i in range(12)]
    DatasetDict({"train": Dataset.from_dict({"text": docs[:2]}),
                 "validation": Dataset.from_dict({"text": docs})}).save_to_disk(in_tmp / "ds")
    cfg = _loss_cfg(in_tmp, tiny_hf_ckpt, "data=hf", f"data.name={in_tmp / 'ds'}", "eval.steps=-1")
    result = app.main(cfg)
    tok = AutoTokenizer.from_pretrained(tiny_hf_ckpt)
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    ref = factories.reference_loss(_model(tiny_hf_ckpt), [np.array(stream)], SEQ)
    assert result["eval/tokens"] == ((len(stream) - 1) // SEQ) * SEQ
    assert abs(result["eval/loss"] - ref) < 1e-5


def test_bfloat16_close_to_float32(in_tmp, tiny_hf_ckpt, tiny_token_shards):
    base = ["data=local", f"data.dataset_path={tiny_token_shards}", "eval.steps=-1"]
    fp32 = app.main(_loss_cfg(in_tmp, tiny_hf_ckpt, *base))
    bf16 = app.main(_loss_cfg(in_tmp, tiny_hf_ckpt, *base, "eval.dtype=bfloat16"))
    assert bf16["eval/tokens"] == fp32["eval/tokens"]
    assert abs(bf16["eval/loss"] - fp32["eval/loss"]) < 0.05 * fp32["eval/loss"]


def test_cli_result_line_results_json_and_mlflow_run(tmp_path, tiny_hf_ckpt, tiny_token_shards):
    db, run_dir = tmp_path / "mlflow.db", tmp_path / "run"
    proc = factories.run_cli(["mode=loss", f"ckpt={tiny_hf_ckpt}", "data=local",
                              f"data.dataset_path={tiny_token_shards}", f"eval.seq_len={SEQ}", "eval.steps=3",
                              f"tracking.uri=sqlite:///{db}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = factories.last_json_line(proc.stdout)
    assert set(line) == {"step", "tokens_seen", "eval/loss", "eval/perplexity", "eval/bpb", "eval/loss_stderr",
                         "eval/tokens", "time/startup_seconds"}
    assert set(np.load(run_dir / "window_nll.npz")) == {"data"}
    assert json.loads((run_dir / "results.json").read_text()) == line
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in proc.stdout
    client, runs = factories.mlflow_runs(db)
    assert len(runs) == 1
    run = runs[0]
    lines = proc.stdout.splitlines()  # the results path, then the UI command and the link to the curves
    at = lines.index(f"results: {run_dir / 'results.json'}")
    assert lines[at + 1].startswith("MLflow: mlflow ui ") and lines[at + 2] == (
        f"View: http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning"
        "&compareRunsMode=CHART&viewStateShareKey=ckpteval")
    assert run.info.status == "FINISHED"
    assert run.data.tags["mode"] == "loss" and run.data.tags["step"] == "120"
    assert run.data.tags["mlflow.runName"] == "loss@120"
    assert run.data.params["eval.seq_len"] == str(SEQ) and run.data.params["data.kind"] == "local"
    history = client.get_metric_history(run.info.run_id, "eval/loss")
    assert [(m.step, m.value) for m in history] == [(120, pytest.approx(line["eval/loss"]))]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", ".hydra"} <= artifacts
    hydra_files = {a.path for a in client.list_artifacts(run.info.run_id, ".hydra")}
    assert ".hydra/config.yaml" in hydra_files


# ---- bad input: one clear line, non-zero exit, no FINISHED run ---------------------------------------------

def _expect_error(tmp: Path, overrides: list[str], match: str, capsys) -> None:
    cfg = factories.compose(["mode=loss", f"tracking.uri=sqlite:///{tmp}/mlflow.db", *overrides])
    with pytest.raises(SystemExit) as exc:
        app.main(cfg)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    assert match in errors[0], errors[0]
    _, runs = factories.mlflow_runs(tmp / "mlflow.db")
    assert all(r.info.status != "FINISHED" for r in runs)


def test_error_nonexistent_checkpoint(in_tmp, tiny_token_shards, capsys):
    _expect_error(in_tmp, [f"ckpt={in_tmp / 'nope'}", "data=local", f"data.dataset_path={tiny_token_shards}"],
                  "does not exist", capsys)


def test_error_missing_ckpt(in_tmp, capsys):
    _expect_error(in_tmp, ["data=local", "data.dataset_path=x"], "ckpt=PATH", capsys)


def test_error_dcp_without_metadata(in_tmp, tiny_token_shards, capsys):
    broken = in_tmp / "step_50"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"\0" * 16)
    _expect_error(in_tmp, [f"ckpt={broken}", "data=local", f"data.dataset_path={tiny_token_shards}"],
                  ".metadata", capsys)


def test_error_tensors_do_not_match_architecture(in_tmp, tiny_hf_ckpt, tiny_token_shards, capsys):
    bad = in_tmp / "step_7"
    shutil.copytree(tiny_hf_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(cfg))
    _expect_error(in_tmp, [f"ckpt={bad}", "data=local", f"data.dataset_path={tiny_token_shards}"], "shape", capsys)


def test_error_token_ids_beyond_vocab(in_tmp, tiny_hf_ckpt, capsys):
    data = factories.make_token_shards(in_tmp / "big", lengths=(400,), vocab=60000)
    _expect_error(in_tmp, [f"ckpt={tiny_hf_ckpt}", "data=local", f"data.dataset_path={data}", f"eval.seq_len={SEQ}"],
                  "vocab", capsys)


def test_error_no_files_match(in_tmp, tiny_hf_ckpt, tiny_token_shards, capsys):
    _expect_error(in_tmp, [f"ckpt={tiny_hf_ckpt}", "data=local", f"data.dataset_path={tiny_token_shards}",
                           "data.file_pattern=*.tokens"], "*.tokens", capsys)


def test_error_empty_split(in_tmp, tiny_hf_ckpt, capsys):
    from datasets import Dataset, DatasetDict

    DatasetDict({"validation": Dataset.from_dict({"text": []})}).save_to_disk(in_tmp / "empty")
    _expect_error(in_tmp, [f"ckpt={tiny_hf_ckpt}", "data=hf", f"data.name={in_tmp / 'empty'}"], "empty", capsys)


def test_error_seq_len_beyond_positions(in_tmp, tiny_hf_ckpt, tiny_token_shards, capsys):
    _expect_error(in_tmp, [f"ckpt={tiny_hf_ckpt}", "data=local", f"data.dataset_path={tiny_token_shards}",
                           "eval.seq_len=300"], "max_position_embeddings", capsys)


def test_error_missing_tokenizer_for_hf_data(in_tmp, tiny_token_shards, capsys):
    from datasets import Dataset

    ckpt = factories.make_hf_checkpoint(in_tmp / "step_3", tokenizer_dir=None)
    Dataset.from_dict({"text": ["hello world"] * 50}).save_to_disk(in_tmp / "ds")
    _expect_error(in_tmp, [f"ckpt={ckpt}", "data=hf", f"data.name={in_tmp / 'ds'}"], "tokenizer", capsys)


def test_error_unreachable_tracking_server(in_tmp, tiny_hf_ckpt, tiny_token_shards, capsys):
    cfg = factories.compose(["mode=loss", f"ckpt={tiny_hf_ckpt}", "data=local",
                             f"data.dataset_path={tiny_token_shards}", "tracking.uri=http://127.0.0.1:9",
                             "tracking.timeout_s=2"])
    with pytest.raises(SystemExit) as exc:
        app.main(cfg)
    assert exc.value.code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "unreachable" in err[0] and "tracking.uri" in err[0]


def _per_document_reference(model, arrays: list[np.ndarray], seq: int, sep: int) -> tuple[float, int]:
    """Every window cut at its documents' ends (a `sep` token ends a document), each piece run alone through a
    plain transformers forward from position 0; token-weighted NLL over all targets of all windows."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for arr in arrays:
            tokens = torch.as_tensor(arr.astype(np.int64))
            for k in range((len(tokens) - 1) // seq):
                inputs, targets = tokens[k * seq:k * seq + seq], tokens[k * seq + 1:k * seq + seq + 1]
                ends = [i + 1 for i in range(seq) if int(inputs[i]) == sep and i + 1 < seq] + [seq]
                start = 0
                for end in ends:
                    logits = model(input_ids=inputs[None, start:end]).logits[0].double()
                    nll += torch.nn.functional.cross_entropy(logits, targets[start:end], reduction="sum").item()
                    count += end - start
                    start = end
    return nll / count, count


def test_doc_mask_scores_each_document_alone(in_tmp, tiny_hf_ckpt):
    """eval.doc_mask=true: windows packed with several documents score each one as if it were run alone."""
    sep = 7
    rng = np.random.default_rng(5)
    data = in_tmp / "docs"
    data.mkdir()
    arrays = []
    for part in range(2):
        docs = [np.append(rng.integers(8, 512, size=int(rng.integers(2, 40))), sep) for _ in range(12)]
        arrays.append(np.concatenate(docs).astype(np.uint16))
        arrays[-1].tofile(data / f"part_{part}.bin")
    common = ("data=local", f"data.dataset_path={data}", "eval.steps=-1")
    masked = app.main(_loss_cfg(in_tmp, tiny_hf_ckpt, *common, "eval.doc_mask=true", f"eval.doc_sep_id={sep}"))
    plain = app.main(_loss_cfg(in_tmp, tiny_hf_ckpt, *common))
    ref, count = _per_document_reference(_model(tiny_hf_ckpt), arrays, SEQ, sep)
    assert masked["eval/tokens"] == count == plain["eval/tokens"]
    assert abs(masked["eval/loss"] - ref) < 1e-5
    assert abs(plain["eval/loss"] - ref) > 1e-3  # the mask changed what each token sees


@pytest.mark.parametrize("chunk", [0, 1, 7, 10_000])
def test_chunked_nll_equals_full_cross_entropy(chunk):
    """Any chunking of the vocabulary projection (0 = auto) gives the full-logits loss; -100 targets are ignored."""
    from ckpteval.evaluation.loss import chunked_nll

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 9, 16)
    targets = torch.randint(0, 50, (3, 9))
    targets[2] = -100  # a padding row
    targets[0, 4] = -100
    with torch.no_grad():
        nll, mask = chunked_nll(hidden, head, targets, chunk)
        full = torch.nn.functional.cross_entropy(head(hidden).reshape(-1, 50).double(), targets.reshape(-1),
                                                 reduction="none", ignore_index=-100).reshape(3, 9)
    assert nll.shape == mask.shape == (3, 9)
    assert int(mask.sum()) == 17 and torch.equal(mask.bool(), targets != -100)
    assert torch.allclose(nll, full, rtol=1e-6, atol=1e-9)  # per token, 0 where ignored


def test_doc_mask_same_under_eager_and_sdpa_attention():
    """The document mask reaches both attention kernels: boolean for sdpa, additive (float) for eager."""
    from ckpteval.evaluation.loss import causal_lm_scorer

    model = factories.make_model(seed=2).eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(8, 512, (3, SEQ + 1), generator=g)
    tokens[:, [5, 11, 20]] = 7  # three document ends per window
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.inference_mode():
        plain = causal_lm_scorer(model, 0)(inputs, targets)[0].sum()
        sdpa = causal_lm_scorer(model, 0, doc_sep=7)(inputs, targets)[0].sum()
        model.set_attn_implementation("eager")
        eager = causal_lm_scorer(model, 0, doc_sep=7)(inputs, targets)[0].sum()
    assert float(eager) == pytest.approx(float(sdpa), rel=1e-5)
    assert abs(float(plain) - float(sdpa)) > 1e-3  # the mask is really applied

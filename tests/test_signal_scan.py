"""A real 2-run x 4-checkpoint scan (two tiny train_eval runs, different seeds and learning rates): bpb, harness/core,
noise, tau, signal and SNR in the table, summary.csv, MLflow and signal.png; the `best` alias on the right checkpoint;
mode=compare reproducing the same numbers from MLflow with the checkpoints gone (no model can be loaded).

References: the per-checkpoint metrics the scan wrote to summary.csv, run through scipy.stats.kendalltau,
numpy's std(ddof=1) and the Signal-and-Noise formulas written out here; scipy's paired t-test on the windows'
NLLs for the leader's p-value.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from ckpteval import app
from ckpteval.tasks import TASKS_DIR
from tests import factories

K = 3
SELECT = "harness/ckpteval_mc/bpb"
MODEL = ["model.vocab_size=512", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
         "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.max_position_embeddings=128"]
CHECKED = ["eval/loss", "harness/ckpteval_mc/bpb", "harness/ckpteval_mc_nodelim/bpb", "harness/ckpteval_mc/acc_norm",
           "harness/core"]
SIGNAL = ["signal.last_k=3", f"signal.select={SELECT}"]


def _text_shards(tmp: Path, tok_dir: Path) -> None:
    """Token shards of real text (the tokenizer's own lines), so the loss falls and the runs differ."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    rng = np.random.default_rng(0)
    for name, n in (("train", 60), ("val", 12)):
        lines = [factories.TEXT[i] for i in rng.integers(0, len(factories.TEXT), size=n)]
        ids = [t for line in lines for t in tok(line)["input_ids"] + [tok.eos_token_id]]
        (tmp / name).mkdir()
        np.asarray(ids, dtype=np.uint16).tofile(tmp / name / "part0.bin")


@pytest.fixture(scope="module")
def scan(tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("signal_scan")
    _text_shards(tmp, tiny_tokenizer_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        for run, lr, seed in (("a", 3e-3, 1), ("b", 2e-2, 2)):
            app.main(factories.compose([
                "mode=train_eval", "data=local", f"data.train_path={tmp / 'train'}", f"data.dataset_path={tmp / 'val'}",
                f"tokenizer={tiny_tokenizer_dir}", *MODEL, "eval.enabled=false", "train.steps=8", "train.batch_size=4",
                "train.seq_len=32", "train.warmup_steps=1", f"train.lr={lr}", f"train.seed={seed}",
                "checkpoint.interval=2", f"checkpoint.dir=runs/{run}", "tracking.enabled=false"]))
    db = tmp / "mlflow.db"
    proc = factories.run_cli(["-m", "mode=loss,harness", "ckpt=glob:runs/*/step_*", "data=local",
                              f"data.dataset_path={tmp / 'val'}", "eval.seq_len=16", "eval.batch_size=4", "eval.steps=2",
                              "harness=offline", f"harness.include_path={TASKS_DIR}",
                              "harness.tasks=[ckpteval_mc,ckpteval_mc_nodelim]", "harness.limit=12", *SIGNAL,
                              f"tracking.uri=sqlite:///{db}"], cwd=tmp, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = (tmp / "outputs" / "multirun").iterdir()
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    client, runs = factories.mlflow_runs(db)
    parent = next(r for r in runs if r.data.tags.get("ckpteval.sweep") == "true")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return {"tmp": tmp, "proc": proc, "sweep_dir": sweep_dir, "rows": rows, "db": db, "client": client,
            "parent": parent, "children": children}


def _series(rows: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metric -> run dir name -> [(step, value)] in step order, from the scan's own summary.csv."""
    out: dict[str, dict[str, list]] = {}
    for row in rows:
        run = Path(row["checkpoint"]).parent.name
        for metric in CHECKED:
            if row.get(metric):
                out.setdefault(metric, {}).setdefault(run, []).append((int(row["step"]), float(row[metric])))
    return {m: {r: sorted(pts) for r, pts in runs.items()} for m, runs in out.items()}


def _expected(rows: list[dict]) -> dict:
    """The Signal-and-Noise numbers written out: per run (last-k mean, noise, tau), across runs (signal, snr)."""
    out = {}
    for metric, runs in _series(rows).items():
        assert sorted(runs) == ["a", "b"] and all(len(p) == 4 for p in runs.values()), metric
        lower = "loss" in metric or "bpb" in metric
        per_run = {}
        for run, pts in runs.items():
            steps, values = zip(*pts)
            tail = np.array(values[-K:])
            tau = stats.kendalltau(steps, values).statistic
            per_run[run] = {"last_k_mean": tail.mean(), "noise": np.std(tail, ddof=1) / abs(tail.mean()),
                            "tau": -tau if lower else tau}
        means = [v["last_k_mean"] for v in per_run.values()]
        signal = (max(means) - min(means)) / abs(np.mean(means))
        noise = np.mean([v["noise"] for v in per_run.values()])
        snr = signal / noise if noise else (math.inf if signal else math.nan)  # a flat metric has no noise
        out[metric] = {"runs": per_run, "signal": signal, "snr": snr,
                       "leader": (min if lower else max)(per_run, key=lambda r: per_run[r]["last_k_mean"])}
    return out


def _close(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b or a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_scan_table_csv_mlflow_and_picture_carry_bpb_core_and_the_signal(scan):
    out, rows = scan["proc"].stdout, scan["rows"]
    assert "== signal vs noise: 2 run(s), last k=3 checkpoint(s) each" in out
    block = out.split("== signal vs noise")[1]
    for metric in CHECKED:
        assert metric in block, metric
    assert {"harness/ckpteval_mc/bpb", "harness/ckpteval_mc/bpb_stderr", "harness/core"} <= set(rows[0])
    expected = _expected(rows)
    metrics = scan["parent"].data.metrics
    for metric, exp in expected.items():
        for row in rows:
            run = Path(row["checkpoint"]).parent.name
            if row["status"] != "COMPLETED":
                continue
            assert row["signal/run"] == f"runs/{run}"
            for name in ("last_k_mean", "noise", "tau"):
                cell = row[f"signal/{metric}/{name}"]
                assert _close(float(cell) if cell else math.nan, exp["runs"][run][name]), (metric, run, name)
            assert row[f"signal/{metric}/leader"] == f"runs/{exp['leader']}"
        for name in ("signal", "snr"):
            key = f"signal/{metric}/{name}"
            if math.isfinite(exp[name]):
                assert _close(metrics[key], exp[name]), key
            else:  # a run with no noise at all (a flat metric): an infinite or undefined SNR is not logged
                assert key not in metrics, key
            assert _close(float(rows[0][key]) if rows[0][key] else math.nan, exp[name]), key
        assert scan["parent"].data.tags[f"signal.leader/{metric}"] == f"runs/{exp['leader']}"
    # each run's own numbers on its jobs' runs (the MLflow group of that training run)
    for child in scan["children"]:
        run = Path(child.data.tags["ckpt"]).parent.name
        assert child.data.tags["signal.run"] == f"runs/{run}"
        assert _close(child.data.metrics["signal/eval/loss/noise"], expected["eval/loss"]["runs"][run]["noise"])
    artifacts = {Path(a.path).name for a in scan["client"].list_artifacts(scan["parent"].info.run_id, "summary")}
    assert {"summary.csv", "summary.png", "signal.png"} <= artifacts
    assert (scan["sweep_dir"] / "signal.png").stat().st_size > 10_000
    note = scan["parent"].data.tags["mlflow.note.content"]
    assert "### Signal vs noise (last k=3 checkpoints per run)" in note and "harness/core" in note


def test_leader_p_value_is_the_paired_t_test_on_the_last_checkpoints_windows(scan):
    """eval/loss: the leader's last checkpoint against the other run's, paired t over the same windows (scipy)."""
    rows = scan["rows"]
    leader = _expected(rows)["eval/loss"]["leader"]
    last = {Path(r["checkpoint"]).parent.name: r for r in rows if r["mode"] == "loss" and r["step"] == "8"}
    other = "b" if leader == "a" else "a"
    nll = {run: np.load(Path(last[run]["run_dir"]) / "window_nll.npz")["data"] for run in (leader, other)}
    p = stats.ttest_rel(nll[leader], nll[other]).pvalue
    assert scan["parent"].data.metrics["signal/eval/loss/leader_p"] == pytest.approx(p, rel=1e-6)


def test_best_alias_points_at_the_best_trailing_mean_checkpoint(scan):
    pts = [(run, step, v) for run, series in _series(scan["rows"])[SELECT].items() for step, v in [
        (s, sum(x for _, x in series[i - K + 1:i + 1]) / K) for i, (s, _) in enumerate(series) if i >= K - 1]]
    run, step, value = min(pts, key=lambda t: t[2])  # bpb: lower is better
    client = scan["client"]
    experiment = client.get_experiment(scan["parent"].info.experiment_id).name
    name = experiment.replace("/", "-") + ".best"
    held = client.get_model_version_by_alias(name, "best")
    assert Path(held.tags["ckpt"]) == scan["tmp"] / "runs" / run / f"step_{step}"
    assert float(held.tags["value"]) == pytest.approx(value, rel=1e-12) and held.tags["metric"] == SELECT
    evaluated = client.get_run(held.run_id)  # the harness job that logged the metric, not a copy of the weights
    assert evaluated.data.tags["mode"] == "harness" and Path(evaluated.data.tags["ckpt"]) == Path(held.tags["ckpt"])
    assert held.source == f"runs:/{held.run_id}"
    assert "alias best moved to it" in scan["proc"].stdout


def test_compare_reproduces_the_scan_from_mlflow_without_any_model(scan, monkeypatch, capsys):
    from ckpteval import checkpoint

    tmp, parent = scan["tmp"], scan["parent"]
    shutil.rmtree(tmp / "runs")  # no checkpoint is left to load

    def no_model(*_a, **_k):
        raise AssertionError("mode=compare loaded a model")

    for fn in ("load_model", "inspect_checkpoint", "load_tokenizer"):
        monkeypatch.setattr(checkpoint, fn, no_model)
    monkeypatch.chdir(tmp)
    result = app.main(factories.compose(["mode=compare", f"compare.parents=[{parent.info.run_id}]", *SIGNAL,
                                         f"tracking.uri=sqlite:///{scan['db']}"]))
    scan_numbers = {k: v for k, v in parent.data.metrics.items() if k.startswith("signal/")}
    assert set(result) == set(scan_numbers)
    for key, value in scan_numbers.items():
        assert _close(result[key], value), key  # leader p-values included: per-sample artifacts from MLflow
    out = capsys.readouterr().out
    assert "== signal vs noise: 2 run(s), last k=3" in out
    written = next(line for line in out.splitlines() if line.startswith("summary: ")).split(": ", 1)[1].split(", ")
    assert written[0].endswith("summary.csv") and written[1].endswith("signal.png")
    with open(written[0]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8  # one row per checkpoint (loss and harness jobs merged)
    scanned = {(r["signal/run"], r["step"]): r for r in scan["rows"] if r["mode"] == "harness"}
    for row in rows:
        for col in (c for c in row if c.startswith("signal/") and c.endswith(("/last_k_mean", "/snr"))):
            want = scanned[(row["run"], row["step"])][col]
            assert (row[col] == want == "") or _close(float(row[col]), float(want)), col

"""Signal or noise over a series (evaluation/signal.py, signal_report.py), the registry's `best` alias on a real sqlite
store (tracking/registry.py), and the watcher's series (ckpteval.series.watcher_signal).

References: scipy.stats.kendalltau, numpy's std(ddof=1), and the Signal-and-Noise formulas written out here.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy import stats

from ckpteval.evaluation import signal as sn
from ckpteval.evaluation.signal_report import SignalSummary

STEPS = [100, 200, 300, 400, 500, 600, 700]
RUN_A = {"eval/loss": [5.0, 4.2, 3.9, 3.95, 3.7, 3.72, 3.65], "harness/t/acc": [0.25, 0.3, 0.28, 0.35, 0.33, 0.36, 0.36]}
RUN_B = {"eval/loss": [5.1, 4.5, 4.3, 4.1, 4.15, 4.0, 4.02], "harness/t/acc": [0.24, 0.26, 0.3, 0.29, 0.31, 0.3, 0.33]}
K = 4


def _records(runs: dict[str, dict[str, list[float]]]) -> list[dict]:
    return [{"run": run, "step": step, "ckpt": f"{run}/step_{step}",
             "metrics": {**{m: v[i] for m, v in series.items()}, "harness/t/acc_stderr": 0.01, "eval/tokens": 999}}
            for run, series in runs.items() for i, step in enumerate(STEPS)]


@pytest.mark.parametrize("seed", range(6))
def test_kendall_tau_b_equals_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, size=12).astype(float)  # ties in both variables
    y = rng.integers(0, 4, size=12).astype(float)
    assert sn.kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert sn.kendall_tau_b(STEPS, RUN_A["eval/loss"]) == pytest.approx(
        stats.kendalltau(STEPS, RUN_A["eval/loss"]).statistic, abs=1e-12)
    assert math.isnan(sn.kendall_tau_b([1, 2, 3], [2, 2, 2]))


def test_single_run_numbers_equal_the_formulas():
    summary = SignalSummary.build(_records({"/r/a": RUN_A}), last_k=K)
    got = summary.metrics()
    assert not summary.multi
    for metric, values in RUN_A.items():
        tail = np.array(values[-K:])
        tau = stats.kendalltau(STEPS, values).statistic
        sign = -1 if metric == "eval/loss" else 1  # + means improving: loss going down, accuracy going up
        assert got[f"signal/{metric}/last_k_mean"] == pytest.approx(tail.mean(), rel=1e-12)
        assert got[f"signal/{metric}/noise"] == pytest.approx(np.std(tail, ddof=1) / abs(tail.mean()), rel=1e-12)
        assert got[f"signal/{metric}/tau"] == pytest.approx(sign * tau, rel=1e-12)
        assert got[f"signal/{metric}/tau"] > 0
    # bookkeeping (stderr, token counts) is not a series
    assert not [k for k in got if "stderr" in k or "tokens" in k]
    assert {k.rsplit("/", 1)[-1] for k in got if not k.startswith("signal/best")} == {"last_k_mean", "noise", "tau"}


def test_several_runs_signal_snr_leader_equal_the_formulas():
    summary = SignalSummary.build(_records({"/r/a": RUN_A, "/r/b": RUN_B}), last_k=K, low_snr=2.0)
    got = summary.metrics()
    for metric in RUN_A:
        means = [np.mean(r[metric][-K:]) for r in (RUN_A, RUN_B)]
        noises = [np.std(r[metric][-K:], ddof=1) / abs(np.mean(r[metric][-K:])) for r in (RUN_A, RUN_B)]
        signal = (max(means) - min(means)) / abs(np.mean(means))
        assert got[f"signal/{metric}/signal"] == pytest.approx(signal, rel=1e-12)
        assert got[f"signal/{metric}/snr"] == pytest.approx(signal / np.mean(noises), rel=1e-12)
        assert summary.metrics_[metric].leader == "/r/a"  # lower loss, higher accuracy
        for run, series in (("/r/a", RUN_A), ("/r/b", RUN_B)):
            st = summary.metrics_[metric].runs[run]
            assert st.last_k_mean == pytest.approx(np.mean(series[metric][-K:]), rel=1e-12)
    # per-run numbers are not the parent's when there are several runs: they go to each run's rows / job runs
    assert "signal/eval/loss/noise" not in got
    assert summary.run_metrics("/r/b")["signal/eval/loss/noise"] == pytest.approx(
        np.std(RUN_B["eval/loss"][-K:], ddof=1) / np.mean(RUN_B["eval/loss"][-K:]), rel=1e-12)
    order = [ms.metric for ms in summary.ordered()]
    snrs = [got[f"signal/{m}/snr"] for m in order]
    assert snrs == sorted(snrs, reverse=True)  # sorted by SNR


def test_best_checkpoint_is_the_best_trailing_mean():
    records = _records({"/r/a": RUN_A, "/r/b": RUN_B})
    summary = SignalSummary.build(records, last_k=3, select="eval/loss")
    candidates = []
    for run, series in (("/r/a", RUN_A), ("/r/b", RUN_B)):
        v = series["eval/loss"]
        for i, step in enumerate(STEPS[2:], start=2):  # full windows of 3 only
            candidates.append((sum(v[i - 2:i + 1]) / 3, run, step))
    value, run, step = min(candidates)
    assert (summary.best.point.run, summary.best.point.step) == (run, step)
    assert summary.best.smoothed == pytest.approx(value, rel=1e-12)
    assert summary.metrics()["signal/best/eval/loss"] == pytest.approx(value)
    # default selection: harness/core, else harness/mean_primary, else eval/loss
    assert SignalSummary.build(records, last_k=3).best.metric == "eval/loss"
    missing = SignalSummary.build(records, last_k=3, select="harness/nope/acc")
    assert missing.best is None and "signal.select=harness/nope/acc was not logged" in missing.notes[0]


def test_last_k_is_capped_and_a_lone_checkpoint_has_no_noise():
    st = sn.run_stats([1, 2], [3.0, 2.0], k=5, lower_is_better=True)
    assert st.k == 2 and st.last_k_mean == 2.5 and st.tau == 1.0
    lone = sn.run_stats([7], [3.0], k=5, lower_is_better=True)
    assert lone.k == 1 and math.isnan(lone.noise) and math.isnan(lone.tau)
    # smoothing: full windows only (w = min(k, n)); flat series: tau undefined, never "-0"
    assert sn.trailing_means([1.0, 2.0, 3.0, 4.0], 3)[2:] == [2.0, 3.0] and math.isnan(sn.trailing_means([1.0], 3)[0]) is False
    assert sn.trailing_means([1.0, 3.0], 5) == [pytest.approx(float("nan"), nan_ok=True), 2.0]
    assert str(sn.improvement_tau([1, 2, 3], [1.0, 2.0, 1.0], lower_is_better=True)) == "0.0"


def test_table_csv_and_picture(tmp_path):
    records = _records({"/r/a": RUN_A, "/r/b": RUN_B})
    summary = SignalSummary.build(records, last_k=K, select="harness/t/acc", low_snr=1e9)  # everything low
    text = summary.table()
    assert "signal vs noise: 2 run(s), last k=4" in text and "harness/t/acc" in text and " low" in text
    assert "best checkpoint by harness/t/acc" in text
    path = summary.write_csv(records, tmp_path / "summary.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(STEPS)  # one row per checkpoint
    a_last = [r for r in rows if r["run"] == "r/a" or r["run"].endswith("a")][-1]
    assert float(a_last["signal/eval/loss/last_k_mean"]) == pytest.approx(np.mean(RUN_A["eval/loss"][-K:]))
    assert float(a_last["signal/eval/loss/snr"]) == pytest.approx(summary.metrics()["signal/eval/loss/snr"])
    assert sum(r["signal/best"] == "True" for r in rows) == 1
    png = summary.plot(tmp_path / "signal.png")
    assert png.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------- registry


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from ckpteval.tracking.store import make_client

    tmp = tmp_path_factory.mktemp("registry")
    client = make_client(f"sqlite:///{tmp}/mlflow.db")
    exp = client.create_experiment("ckpts/run1", artifact_location=(tmp / "art").as_uri())
    return tmp, client, exp


def _finished_run(client, exp: str, ckpt: str) -> str:
    run = client.create_run(exp, tags={"ckpt": ckpt})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def check_alias_moves_only_to_a_better_checkpoint(client, runs: dict[str, str], name: str) -> None:
    """Shared by the sqlite test here and the `mlflow server` one (tests/test_signal_scan.py)."""
    from ckpteval.tracking.registry import register_best

    def reg(ckpt, value, k=3):
        return register_best(client, name, ckpt=ckpt, step=int(ckpt.rsplit("_", 1)[1]), metric="eval/loss",
                             value=value, lower=True, k=k, run_id=runs[ckpt])

    def holder():
        return client.get_model_version_by_alias(name, "best")

    assert "alias best moved to it" in reg("/c/step_100", 3.0)
    assert holder().tags["ckpt"] == "/c/step_100" and holder().source == f"runs:/{runs['/c/step_100']}"
    assert "stays on version 1" in reg("/c/step_200", 3.5)  # worse: the alias stays
    assert holder().version == "1" or int(holder().version) == 1
    assert "moved from version 1" in reg("/c/step_300", 2.5)  # better: a new version, the alias moves
    v = holder()
    assert v.tags["ckpt"] == "/c/step_300" and v.tags["metric"] == "eval/loss" and float(v.tags["value"]) == 2.5
    assert v.run_id == runs["/c/step_300"] and v.tags["eval_run_id"] == runs["/c/step_300"]
    assert "already points at" in reg("/c/step_300", 2.5)  # nothing new
    assert len(client.search_model_versions(f"name='{name}'")) == 2  # the worse one was never registered
    # a value over another window (the series grew past k, or signal.last_k changed) is a new criterion: it replaces
    assert "moved from version 2" in reg("/c/step_200", 3.5, k=5)
    assert holder().tags["ckpt"] == "/c/step_200" and holder().tags["k"] == "5"


def test_registry_alias_moves_when_a_better_checkpoint_arrives_sqlite(store):
    _, client, exp = store
    runs = {c: _finished_run(client, exp, c) for c in ("/c/step_100", "/c/step_200", "/c/step_300")}
    check_alias_moves_only_to_a_better_checkpoint(client, runs, "ckpts-run1.best")


def test_model_name_from_the_experiment_and_bad_names():
    from ckpteval.errors import CkptEvalError
    from ckpteval.tracking.registry import model_name_for

    assert model_name_for("train_eval/2026-11-24_05-48-44") == "train_eval-2026-11-24_05-48-44.best"
    assert model_name_for("x", "mine") == "mine"
    with pytest.raises(CkptEvalError, match="signal.model_name='a/b' is not a registered-model name"):
        model_name_for("x", "a/b")


def test_watcher_series_logs_signal_and_registers_the_best(store, monkeypatch):
    """The watcher's summary run gets signal/... after each evaluation; the alias follows the best checkpoint."""
    from ckpteval.series import watcher_signal
    from ckpteval.tracking.run import Run
    from tests import factories

    tmp, client, exp = store
    summary = client.create_run(exp, tags={"mode": "watch", "evaluation": "watcher"})
    run = Run(client, summary.info.run_id, f"sqlite:///{tmp}/mlflow.db")
    cfg = factories.compose(["mode=watch", "signal.last_k=2", "signal.select=eval/loss",
                             "signal.model_name=watched.best"])
    entries = {}
    losses = [4.0, 3.0, 3.2, 2.0]
    for i, (step, loss) in enumerate(zip((10, 20, 30, 40), losses)):
        ckpt = f"/w/step_{step}"
        entries[f"id{i}/loss"] = {"status": "done", "step": step, "ckpt": ckpt, "time": i,
                                  "metrics": {"eval/loss": loss, "step": step}, "run_id": _finished_run(client, exp, ckpt)}
        found = watcher_signal(entries, cfg, run, "/w")
    got = client.get_run(run.run_id).data.metrics
    tail = np.array(losses[-2:])
    assert got["signal/eval/loss/last_k_mean"] == pytest.approx(tail.mean())
    assert got["signal/eval/loss/noise"] == pytest.approx(np.std(tail, ddof=1) / tail.mean())
    assert got["signal/eval/loss/tau"] == pytest.approx(-stats.kendalltau([10, 20, 30, 40], losses).statistic)
    # trailing means over min(2, n): 4.0 (n=1), then 3.5, 3.1, 2.6 -> step 40
    assert found.best.point.step == 40
    held = client.get_model_version_by_alias("watched.best", "best")
    assert held.tags["ckpt"] == "/w/step_40" and float(held.tags["value"]) == pytest.approx(2.6)
    # each evaluation brought a new best (4.0 at 10, then 3.5, 3.1, 2.6): one version each, the alias on the last
    assert sorted(float(v.tags["value"]) for v in client.search_model_versions("name='watched.best'")) == \
        pytest.approx([2.6, 3.1, 3.5, 4.0])


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, line", [
    (["mode=compare"], ("error: mode=compare needs finished runs to compare: compare.experiments=[NAME,...], "
                        "compare.parents=[SCAN_PARENT_RUN_ID,...] or compare.runs=[RUN_ID,...]")),
    (["mode=compare", "compare.experiments=[nope]"], "error: compare.experiments: no experiment 'nope' in this store"),
    (["mode=compare", "signal.last_k=0"], "error: signal.last_k=0 is out of range: use 1 or more (signal.last_k=N)"),
    (["mode=loss", "ckpt=x", "signal.model_name=a/b"], "error: signal.model_name='a/b' is not a registered-model name"),
])
def test_bad_signal_and_compare_input_is_one_error_line(tmp_path, monkeypatch, capsys, overrides, line):
    from ckpteval import app
    from tests import factories

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        app.main(factories.compose([*overrides, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                    "tracking.enabled=false"]))
    assert exit_info.value.code == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert len(err) == 1 and err[0].startswith(line), err

"""MLflow layout: one experiment per training run, short run names that say what a run is."""

from __future__ import annotations

import pytest

from ckpteval.metrics import table_metrics
from ckpteval.tracking import naming
from tests import factories


def test_experiment_is_the_training_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "train_eval" / "2026-11-24_05-51-36"
    (run / "checkpoints" / "step_20").mkdir(parents=True)
    expected = "train_eval/2026-11-24_05-51-36"
    assert naming.experiment_name(str(run / "checkpoints" / "step_20")) == expected
    assert naming.experiment_name("glob:outputs/train_eval/2026-11-24_05-51-36/checkpoints/step_*") == expected
    assert naming.experiment_name("glob:outputs/train_eval/*/checkpoints/step_*") == expected  # one run matches
    assert naming.checkpoint_dir_experiment(str(run / "checkpoints")) == expected  # watch.dir, checkpoint.dir
    (tmp_path / "outputs" / "train_eval" / "other" / "checkpoints" / "step_1").mkdir(parents=True)
    assert naming.experiment_name("glob:outputs/train_eval/*/checkpoints/step_*") == "ckpteval"  # two runs
    assert naming.experiment_name("/ckpts/run1/step_1000") == "ckpts/run1"
    assert naming.experiment_name("s3://bucket/run1/step_100") == "bucket/run1"
    (tmp_path / "hf_export").mkdir()
    assert naming.experiment_name(str(tmp_path / "hf_export")) == "ckpteval"  # no training run to group by


def test_config_resolves_the_experiment_and_an_override_wins(tmp_path):
    cfg = factories.compose(["mode=loss", "ckpt=/ckpts/run1/step_5"])
    assert cfg.tracking.experiment == "ckpts/run1"
    cfg = factories.compose(["mode=watch", "watch.dir=/ckpts/run1"])
    assert cfg.tracking.experiment == "ckpts/run1"
    cfg = factories.compose(["mode=train_eval", f"checkpoint.dir={tmp_path}/run1/checkpoints"])
    assert cfg.tracking.experiment == f"{tmp_path.name}/run1"
    assert factories.compose(["mode=loss", "ckpt=/ckpts/run1/step_5", "tracking.experiment=mine"]) \
        .tracking.experiment == "mine"


@pytest.mark.parametrize("fn, args, name", [
    (naming.job_run_name, ("loss", "/c/step_1200", 1200), "loss@1200"),
    (naming.job_run_name, ("harness", "/models/llama-1b", None), "harness:llama-1b"),
    (naming.watch_run_name, ("loss", "/c/step_1200", 1200), "watch:loss@1200"),
    (naming.watcher_run_name, ("/ckpts/run1/",), "watcher:run1"),
    (naming.scan_run_name, ("loss", "outputs/multirun/2026-11-24_05-51-02"), "scan:loss 05-51-02"),
])
def test_run_names_are_short_and_say_what_they_are(fn, args, name):
    assert fn(*args) == name
    assert len(name) <= 20  # the runs table's name column shows about 20 characters


def test_new_experiments_open_on_the_runs_view(tmp_path):
    """Experiments we create carry MLflow's experiment-kind tag for model development (shown by the UI; MLflow
    3.17 itself picks GenAI vs Model training from the URL or the browser, hence the links below)."""
    from omegaconf import OmegaConf

    from ckpteval.config import TrackingConfig
    from ckpteval.tracking.store import open_client

    cfg = OmegaConf.structured(TrackingConfig(uri=f"sqlite:///{tmp_path}/ml.db", experiment="run1"))
    client, experiment_id, _ = open_client(cfg)
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def _query(url: str) -> dict[str, str]:
    from urllib.parse import parse_qsl, urlsplit

    route = urlsplit(url).fragment  # the UI routes in the fragment: #/experiments/ID/runs?...
    path, _, query = route.partition("?")
    return {"path": path, **dict(parse_qsl(query))}


def test_view_urls_open_the_model_training_charts():
    table, charts = naming.view_urls("http://mlflow.internal:5000/", "7")
    assert _query(charts) == {"path": "/experiments/7/runs", "workflowType": "machine_learning",
                              "compareRunsMode": "CHART", "viewStateShareKey": naming.VIEW_KEY}
    assert _query(table)["compareRunsMode"] == "TABLE" and table.startswith("http://mlflow.internal:5000/#/")
    assert "viewStateShareKey" not in _query(naming.view_urls("http://h", "7", shared_view=False)[1])


def test_a_job_prints_the_view_link_and_saves_the_key_metrics_view(tmp_path, capsys):
    """What every mode prints next to its results path, on a local sqlite store (no server): the `mlflow ui`
    command, then the curves link; the saved view (listed under "Views" in the UI) gains the job's metrics."""
    import json

    from omegaconf import OmegaConf

    from ckpteval.config import TrackingConfig
    from ckpteval.tracking import open_run, print_view

    db = tmp_path / "ml.db"
    cfg = OmegaConf.structured(TrackingConfig(uri=f"sqlite:///{db}", experiment="ckpts/run1",
                                              outbox=str(tmp_path / "outbox")))
    first = open_run(cfg, "watcher:run1", {"mode": "watch"})
    print_view(first, cfg)  # the watcher at start: no metrics yet, no saved view to name
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"MLflow: mlflow ui --backend-store-uri sqlite:///{db}  (then open the View link)"
    assert out[1].startswith("View: http://127.0.0.1:5000/#/experiments/")
    assert "viewStateShareKey" not in _query(out[1])

    run = open_run(cfg, "loss@100", {"mode": "loss"})
    run.end("FINISHED")
    result = {"step": 100, "eval/loss": 3.2, "eval/bpb": 1.1, "eval/tokens": 4096, "eval/loss_stderr": 0.01,
              "harness/hellaswag/acc": 0.3, "eval/web/loss": 3.5}
    print_view(run, cfg, table_metrics(result), command=False)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("View: ")
    experiment_id = run.client.get_run(run.run_id).info.experiment_id
    assert _query(out[0][len("View: "):]) == {"path": f"/experiments/{experiment_id}/runs",
                                               "workflowType": "machine_learning", "compareRunsMode": "CHART",
                                               "viewStateShareKey": naming.VIEW_KEY}
    envelope = json.loads(run.client.get_experiment(experiment_id).tags[naming.VIEW_TAG])
    assert envelope["name"] == naming.VIEW_NAME and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["selectedColumns"] == ["metrics.`eval/loss`", "metrics.`eval/bpb`", "metrics.`eval/web/loss`",
                                        "metrics.`harness/hellaswag/acc`"]
    assert state["runsHiddenMode"] == "SHOW_ALL"

    naming.publish_view(run, ["harness/arc_easy/acc"])  # a later job adds its columns, keeps the others
    state = json.loads(json.loads(run.client.get_experiment(experiment_id).tags[naming.VIEW_TAG])["state"])
    assert state["selectedColumns"][0] == "metrics.`harness/arc_easy/acc`" and len(state["selectedColumns"]) == 5


def test_timings_counts_and_stderrs_are_bookkeeping_not_metrics():
    """What a job reports about itself (timings, counts, standard errors) is logged but never a table column,
    a ranked metric or a signal series; what measures the checkpoint is."""
    from ckpteval.evaluation.signal_report import series_metrics
    from ckpteval.metrics import is_bookkeeping

    bookkeeping = ["time/startup_seconds", "harness/runtime_s", "harness/overhead_s", "harness/batch_tokens",
                   "eval/tokens", "eval/loss_stderr", "harness/t/acc_stderr", "harness/t/n_samples", "eval/n"]
    measures = ["eval/loss", "eval/bpb", "eval/perplexity", "harness/t/acc", "harness/t/bpb", "harness/core",
                "harness/mean_primary", "eval/web/loss"]
    assert [m for m in bookkeeping if not is_bookkeeping(m)] == []
    assert [m for m in measures if is_bookkeeping(m)] == []
    result = {"step": 1, **{m: 1.0 for m in bookkeeping + measures}}
    assert sorted(table_metrics(result)) == sorted(measures)
    assert series_metrics([{"metrics": result}]) == measures

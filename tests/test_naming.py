"""MLflow layout: one experiment per training run, short run names that say what a run is."""

from __future__ import annotations

import pytest

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
    """Experiments we create carry MLflow's experiment-kind tag for model development, so the UI opens them on the
    runs table and charts (MLflow 3 otherwise opens its empty GenAI overview)."""
    from omegaconf import OmegaConf

    from ckpteval.config import TrackingConfig
    from ckpteval.tracking.store import open_client

    cfg = OmegaConf.structured(TrackingConfig(uri=f"sqlite:///{tmp_path}/ml.db", experiment="run1"))
    client, experiment_id, _ = open_client(cfg)
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

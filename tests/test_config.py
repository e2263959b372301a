"""Composition: every group option composes; typos and wrong types fail at compose time, before any work."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from tests import factories


def test_default_config_is_the_demo():
    cfg = factories.compose([])
    assert cfg.mode.name == "train_eval" and cfg.data.demo and cfg.parallel.name == "none"
    assert cfg.tracking.uri.startswith("sqlite:///") and cfg.tracking.uri.endswith("outputs/mlflow.db")


@pytest.mark.parametrize("override", ["mode=loss", "mode=harness", "mode=convert", "mode=prepare", "mode=watch",
                                      "data=local", "data=hf", "model=small", "harness=quick"])
def test_every_group_option_composes(override):
    cfg = factories.compose([override])
    assert cfg is not None


def test_typo_in_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="stpes"):
        factories.compose(["eval.stpes=3"])


def test_wrong_type_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, ValidationError), match="steps"):
        factories.compose(["eval.steps=abc"])


def test_typo_on_the_cli_is_one_clear_error(tmp_path):
    proc = factories.run_cli(["mode=loss", "eval.stpes=3"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "stpes" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # nothing ran, nothing logged

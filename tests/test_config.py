"""Composition: every option of every config group (found on disk) and every sweep composes and resolves; typos and
wrong types fail at compose time, before any work."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from ckpteval.config import ModeName
from tests import factories


def test_default_config_is_the_demo():
    cfg = factories.compose([])
    assert cfg.mode.name == "train_eval" and cfg.data.demo and cfg.parallel.name == "none"
    assert cfg.tracking.uri.startswith("sqlite:///") and cfg.tracking.uri.endswith("outputs/mlflow.db")


CONF = factories.REPO / "conf"
# Every option of every config group, found on disk (conf/GROUP/NAME.yaml, conf/hydra/launcher/NAME.yaml): a file
# added tomorrow is composed by this test without anyone listing it.
OPTIONS = sorted(f"{p.parent.relative_to(CONF).as_posix()}={p.stem}" for p in CONF.glob("**/*.yaml")
                 if p.parent != CONF)


def test_the_option_list_sees_every_group():
    groups = {o.split("=")[0] for o in OPTIONS}
    assert {"mode", "parallel", "data", "model", "tracking", "harness", "eval_suite", "sweep",
            "hydra/launcher"} <= groups, groups
    assert {f"mode={m.value}" for m in ModeName} <= set(OPTIONS)  # every mode has its file


@pytest.mark.parametrize("override", OPTIONS)
def test_every_option_of_every_group_composes_and_resolves(override, monkeypatch, tmp_path):
    monkeypatch.setenv("EVAL_DATA", str(tmp_path))  # conf/eval_suite/example.yaml reads it
    monkeypatch.chdir(tmp_path)
    group, name = override.split("=")
    if group.startswith("hydra/"):  # Hydra's own groups: the node lives under `hydra`, composed with it
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            cfg = compose(config_name="config", overrides=[override], return_hydra_config=True)
        assert OmegaConf.select(cfg, group.replace("/", "."))._target_
        return
    cfg = factories.compose([override])
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation and resolver answers
    assert resolved["mode"]["name"] in {m.value for m in ModeName}
    if group == "mode":
        assert cfg.mode.name == name


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_every_sweep_is_a_multirun_of_the_ckpteval_sweeper(name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=[f"sweep={name}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"  # `python run.py sweep=NAME` needs no -m
    assert cfg.hydra.sweeper._target_.endswith("CkptEvalSweeper")
    assert any(str(v).startswith("glob:") for v in (cfg.hydra.sweeper.params or {}).values())


def test_no_shipped_config_points_into_the_tests():
    for path in CONF.glob("**/*.yaml"):
        assert "tests/" not in path.read_text(), path


def test_the_offline_tasks_are_package_data():
    from ckpteval.tasks import TASKS_DIR

    cfg = factories.compose(["mode=harness", "harness=offline"])
    assert cfg.harness.include_path == str(TASKS_DIR)
    assert {"ckpteval_mc.yaml", "ckpteval_rolling.yaml", "ckpteval_mc.jsonl"} <= {p.name for p in TASKS_DIR.iterdir()}


def test_every_mode_name_is_dispatched():
    from ckpteval.app import MODES

    assert set(MODES) == {m.value for m in ModeName}


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

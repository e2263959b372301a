"""Checkpoint scans: glob expansion (order, escaping, errors, incomplete skip, products), plugin discovery, the
summary, and one end-to-end `python run.py -m` over 3 good + 1 broken + 1 incomplete checkpoint."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ckpteval import app
from ckpteval import scan as sweep
from ckpteval.errors import CkptEvalError
from tests import factories

SEQ = 32


def fake_hf_ckpt(path: Path) -> Path:
    """The cheapest dir `check_complete` accepts as an HF checkpoint (config.json + a whole safetensors file)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    save_file({"w": torch.zeros(4)}, str(path / "model.safetensors"))
    return path


def truncate(path: Path, keep: int = 40) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


# ------------------------------------------------------------------------------------------ expansion


NASTY = ["/data/run 1/step_100", "/data/a,b/step_2", "/data/it's/step_3", '/data/say "hi"/step_4', "/d/x=y/step_5",
         "/d/[br]{c}(p)/step_6", "/d/${oc.env:HOME}/step_7", "/d/back\\slash/step_8", "/d/trail\\", "/d/ünï #1/s",
         "/d/a:b/step_9", "/d/quote\\'mix/s", "/d/esc\\${x}/s"]


@pytest.mark.parametrize("path", NASTY)
def test_quoted_value_composes_back_to_the_exact_path(path):
    """The real contract: the job's composed config holds exactly the matched path."""
    assert factories.compose(["mode=loss", f"ckpt={sweep.quote_value(path)}"]).ckpt == path


def test_expand_pattern_natural_step_order_and_absolute_paths(tmp_path):
    for name in ["step_100", "step_20", "step_3", "step_1000", "global_step7", "checkpoint-50", "final"]:
        fake_hf_ckpt(tmp_path / "ckpts" / name)
    got = sweep.expand_pattern("ckpts/*", cwd=tmp_path)
    assert got == [str(tmp_path / "ckpts" / n) for n in
                   ["step_3", "global_step7", "step_20", "checkpoint-50", "step_100", "step_1000", "final"]]


def test_expand_pattern_skips_incomplete_with_a_warning(tmp_path, caplog):
    good = [fake_hf_ckpt(tmp_path / f"step_{s}") for s in (1, 2)]
    partial = fake_hf_ckpt(tmp_path / "step_3")
    truncate(partial / "model.safetensors")  # a copy cut short
    dcp = tmp_path / "step_4"
    dcp.mkdir()
    (dcp / "__0_0.distcp").write_bytes(b"x")  # a DCP save that never wrote .metadata
    (tmp_path / "step_5.log").write_text("not a checkpoint")
    with caplog.at_level("WARNING", logger="ckpteval.sweep"):
        got = sweep.expand_pattern(str(tmp_path / "step_*"))
    assert got == [str(p) for p in good]
    warned = caplog.text
    assert "step_3" in warned and "truncated" in warned
    assert "step_4" in warned and ".metadata" in warned and "step_5.log" in warned


def test_expand_pattern_no_match_names_pattern_and_cwd(tmp_path):
    with pytest.raises(CkptEvalError) as err:
        sweep.expand_pattern("ckpts/step_*", cwd=tmp_path)
    assert "glob:ckpts/step_*" in str(err.value) and str(tmp_path) in str(err.value)


def test_expand_pattern_only_incomplete_matches_is_an_error(tmp_path):
    truncate(fake_hf_ckpt(tmp_path / "step_1") / "model.safetensors")
    with pytest.raises(CkptEvalError, match="no complete checkpoint"):
        sweep.expand_pattern("step_*", cwd=tmp_path)


def test_expand_pattern_cwd_with_glob_characters_is_literal(tmp_path):
    root = tmp_path / "exp[1]"
    fake_hf_ckpt(root / "step_1")
    assert sweep.expand_pattern("step_*", cwd=root) == [str(root / "step_1")]


def test_every_nth_keeps_the_newest():
    assert sweep.every_nth(list(range(10)), 4) == [0, 4, 8, 9]
    assert sweep.every_nth(list(range(9)), 4) == [0, 4, 8]
    assert sweep.every_nth([1, 2], 1) == [1, 2]


def test_glob_overrides_product_with_other_sweeps_and_escaping(tmp_path):
    paths = [fake_hf_ckpt(tmp_path / "run 1,final" / f"step_{s}") for s in (30, 4)]
    fake_hf_ckpt(tmp_path / "it's" / "step_9")
    lists = sweep.job_override_lists(
        parse(["mode=loss,harness", f"ckpt='glob:{tmp_path}/run 1,final/step_*',\"glob:{tmp_path}/it's/step_*\"",
               "eval.steps=3"]),
        lambda pattern: sweep.expand_pattern(pattern), parent_run_id="abc123")
    jobs = [list(x) for x in itertools.product(*lists)]
    assert len(jobs) == 2 * 3
    composed = [factories.compose(job) for job in jobs]
    expected_ckpts = [str(paths[1]), str(paths[0]), str(tmp_path / "it's" / "step_9")]  # step order per glob
    assert [(c.mode.name, c.ckpt) for c in composed] == list(itertools.product(["loss", "harness"], expected_ckpts))
    assert all(c.eval.steps == 3 and c.tracking.parent_run_id == "abc123" for c in composed)


def test_sweeper_params_from_config_expand_and_command_line_wins(tmp_path, monkeypatch):
    from hydra_plugins.ckpteval_sweeper.ckpteval_sweeper import CkptEvalSweeper

    for s in (1, 2, 3, 4, 5):
        fake_hf_ckpt(tmp_path / "a" / f"step_{s}")
    fake_hf_ckpt(tmp_path / "b" / "step_7")
    monkeypatch.chdir(tmp_path)
    sweeper = CkptEvalSweeper(params={"ckpt": "glob:a/step_*", "mode": "loss"}, every=2)
    sweeper.hydra_context = SimpleNamespace(config_loader=None)
    [batch] = sweeper.job_batches(["eval.steps=1"])  # the sweep file's pattern, every 2nd + newest
    assert [job[0] for job in batch] == [f"ckpt={sweep.quote_value(str(tmp_path / 'a' / f'step_{s}'))}"
                                         for s in (1, 3, 5)]
    [batch] = sweeper.job_batches(["ckpt=glob:b/step_*"])  # the command line replaces it
    assert [job[0] for job in batch] == [f"ckpt={sweep.quote_value(str(tmp_path / 'b' / 'step_7'))}"]


# ------------------------------------------------------------------------------------------ discovery, configs


def test_hydra_discovers_the_sweeper_and_the_config_selects_it():
    from hydra import compose, initialize_config_dir
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    from ckpteval.config import register_configs

    names = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)]
    assert "hydra_plugins.ckpteval_sweeper.ckpteval_sweeper.CkptEvalSweeper" in names
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(factories.REPO / "conf")):
        cfg = compose(config_name="config", overrides=["sweep=scan_every_nth"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("CkptEvalSweeper")
    assert cfg.hydra.callbacks.sweep._target_ == "ckpteval.scan.SweepCallback"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.sweeper.every == 5
    assert cfg.hydra.sweeper.params.ckpt.startswith("glob:") and cfg.harness.tasks == ["arc_easy", "piqa"]


def test_reused_composition_equals_hydras_own_for_every_job():
    """A scan's later jobs reuse the last composition when only plain values differ (ckpteval.scan.compose): each
    config must be Hydra's own `load_sweep_config` result, whole (the hydra node included), and a group choice,
    a dict value or a key set twice must be composed afresh."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from ckpteval.config import register_configs
    from ckpteval.scan.compose import ReusedComposition

    register_configs()
    common = ["eval.steps=3", "tracking.parent_run_id=abc"]
    jobs = [  # (overrides, reused?)
        (["mode=loss", "ckpt=/r/step_1", *common], False),
        (["mode=loss", "ckpt=/r/step_2", *common], True),
        (["mode=loss", "ckpt='/r/epoch=0-step=3.ckpt'", "eval.steps=5", "tracking.parent_run_id=abc"], True),
        (["mode=harness", "ckpt=/r/step_4", *common], False),  # a group choice
        (["mode=harness", "ckpt=/r/step_5", *common], True),
        (["mode=harness", "ckpt=/r/step_6", "eval.steps=3", "harness.tasks=[a,b]"], False),  # another key
        (["mode=harness", "ckpt=/r/step_7", "eval.steps=3", "harness.tasks=[c]"], False),  # a list value
        (["mode=harness", "ckpt=/r/step_8", "eval.steps=4", "eval.steps=7"], False),
        (["mode=harness", "ckpt=/r/step_9", "eval.steps=5", "eval.steps=7"], False),  # a key set twice
        (["mode=harness", "ckpt=/r/step_10", "data=local", "eval.steps=7"], False),
        (["mode=harness", "ckpt=/r/step_11", "data=local", "eval.steps=8"], True),
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(factories.REPO / "conf")):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", overrides=["hydra.sweep.dir=/tmp/s"], run_mode=RunMode.MULTIRUN)
        reusing = ReusedComposition(loader)
        for num, (overrides, reused) in enumerate(jobs):
            before = reusing.reused
            got = reusing.load_sweep_config(master, overrides)
            assert reusing.reused - before == reused, overrides
            want = loader.load_sweep_config(master, overrides)
            assert OmegaConf.to_container(got) == OmegaConf.to_container(want), overrides
            assert list(got.hydra.overrides.task) == overrides and got.ckpt == want.ckpt
            with open_dict(got):  # as the launcher does: must not leak into the next job's config
                got.hydra.job.num = num
                got.ckpt = "/tampered"
        assert reusing.reused == 4
        with pytest.raises(ConfigCompositionException):  # a bad value: Hydra's own error, as without reuse
            reusing.load_sweep_config(master, ["mode=harness", "ckpt=/r/step_12", "data=local", "eval.steps=x"])
    assert reusing.reused == 4
    # SLURM/joblib launchers pickle the launcher, its config loader included
    import pickle

    copied = pickle.loads(pickle.dumps(ReusedComposition(SimpleNamespace(name="hydra's loader"))))
    assert copied.name == "hydra's loader" and copied.reused == 0


@pytest.mark.parametrize("name,mode", [("scan_loss", "loss"), ("scan_harness", "harness")])
def test_ready_sweep_files_compose(name, mode):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(factories.REPO / "conf")):
        cfg = compose(config_name="config", overrides=[f"sweep={name}"], return_hydra_config=True)
    assert cfg.mode.name == mode and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params.ckpt.startswith("glob:")


def test_glob_without_multirun_says_add_m(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        app.main(factories.compose(["mode=loss", "ckpt=glob:ckpts/step_*", "tracking.enabled=false"]))
    assert exc.value.code == 2 and "add -m" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ summary


def _status(dir_: Path, job: int, ckpt: str, result=None, error=None, overrides=()):
    dir_.mkdir(parents=True)
    (dir_ / sweep.STATUS_FILE).write_text(json.dumps({
        "job": job, "status": "FAILED" if error else "COMPLETED", "ckpt": ckpt, "mode": "loss",
        "overrides": [f"ckpt={ckpt}", *overrides], "result": result, "error": error}))


def test_summary_table_best_per_metric_and_failures(tmp_path):
    _status(tmp_path / "0", 0, "/c/step_200", {"step": 200, "eval/loss": 2.5, "acc": 0.4, "eval/tokens": 99})
    _status(tmp_path / "1", 1, "/c/step_100", {"step": 100, "eval/loss": 3.0, "acc": 0.6, "eval/tokens": 99})
    _status(tmp_path / "2", 2, "/c/step_300", error="checkpoint /c/step_300 is broken: re-save it")
    records = sweep.load_records(tmp_path)
    assert [(r.step, r.status) for r in records] == [(100, "COMPLETED"), (200, "COMPLETED"), (300, "FAILED")]
    best = sweep.best_per_metric(records, sweep.key_metrics(records))
    assert best["eval/loss"].step == 200 and best["acc"].step == 100  # loss: lowest wins; accuracy: highest
    assert "eval/tokens" not in best
    table = sweep.summary_table(records)
    assert "step_300" in table and "re-save it" in table and "FAILED" in table
    rows = (tmp_path / "s.csv").read_text() if sweep.write_csv(records, tmp_path / "s.csv") else ""
    assert rows.splitlines()[0].startswith("job,checkpoint,step") and len(rows.splitlines()) == 4
    png = sweep.plot_metrics(records, tmp_path / "s.png", "t")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_skipped_checkpoints_are_rows_of_the_table_csv_and_parent_note(tmp_path):
    """A match that is no complete checkpoint is never a job, but it is a SKIPPED row with its reason, in step
    order, and the closing line counts it."""
    from ckpteval.scan.summary import summary_markdown

    fake_hf_ckpt(tmp_path / "ckpts" / "step_100")
    truncate(fake_hf_ckpt(tmp_path / "ckpts" / "step_200") / "model.safetensors")  # a corrupt copy
    fake_hf_ckpt(tmp_path / "ckpts" / "step_300")
    found = sweep.match_pattern("ckpts/step_*", cwd=tmp_path)
    assert [Path(p).name for p in found.complete] == ["step_100", "step_300"]
    assert [(Path(s.ckpt).name, "truncated" in s.reason) for s in found.skipped] == [("step_200", True)]
    runs = tmp_path / "sweep"
    _status(runs / "0", 0, found.complete[0], {"step": 100, "eval/loss": 3.0})
    _status(runs / "1", 1, found.complete[1], error="broken: re-save it")
    records = sweep.load_records(runs, skipped=found.skipped + found.skipped)  # matched by two globs: one row
    assert [(r.step, str(r.status)) for r in records] == [(100, "COMPLETED"), (200, "SKIPPED"), (300, "FAILED")]
    table = sweep.summary_table(records)
    assert table.splitlines()[0].startswith("== sweep summary: 2 job(s), 1 completed, 1 failed")
    assert table.splitlines()[-1] == "3 checkpoint(s): 1 completed, 1 failed, 1 skipped"
    assert "skipped checkpoints (not complete):" in table and "step_200: " in table and "truncated" in table
    rows = sweep.write_csv(records, tmp_path / "s.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[2].startswith(",") and ",SKIPPED," in rows[2] and "truncated" in rows[2]
    note = summary_markdown(records)
    assert note.startswith("3 checkpoint(s): 1 completed, 1 failed, 1 skipped") and "SKIPPED: " in note
    assert sweep.best_per_metric(records, sweep.key_metrics(records))["eval/loss"].step == 100


def test_fixed_cost_per_job_is_the_median_of_the_completed_jobs_startup(tmp_path):
    """Each job's `time/startup_seconds` (its start to its first request): the summary's fixed-cost line gives the
    median and range over the completed jobs; it never becomes a metric column."""
    runs = tmp_path / "sweep"
    for job, (step, startup) in enumerate([(100, 4.0), (200, 2.0), (300, 3.0), (400, 9.0)]):
        _status(runs / str(job), job, str(tmp_path / f"step_{step}"),
                {"step": step, "eval/loss": 3.0 - job / 10, "time/startup_seconds": startup})
    records = sweep.load_records(runs)
    table = sweep.summary_table(records)
    assert "fixed cost per job: 3.50 s median, 2.00-9.00 s (time/startup_seconds" in table and "4 job(s))" in table
    assert "time/startup_seconds" not in table.splitlines()[1]  # the header: not a metric column
    assert table.splitlines()[-1] == "4 checkpoint(s): 4 completed, 0 failed, 0 skipped"


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_multirun_scan_end_to_end(tmp_path, tiny_tokenizer_dir, tiny_token_shards):
    """3 good checkpoints + 1 broken (config/weights mismatch) + 1 incomplete (skipped): 4 child runs under a
    parent with the summary artifacts; losses checked against plain transformers on the same windows."""
    from transformers import AutoModelForCausalLM

    ckpts = tmp_path / "ckpts"
    steps = [1200, 100, 300]
    for seed, step in enumerate(steps):
        factories.make_hf_checkpoint(ckpts / f"step_{step}", tiny_tokenizer_dir, seed=seed)
    broken = ckpts / "step_400"
    shutil.copytree(ckpts / "step_300", broken)
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    shutil.copytree(ckpts / "step_300", ckpts / "step_500")
    truncate(ckpts / "step_500" / "model.safetensors", 5000)
    db = tmp_path / "mlflow.db"

    proc = factories.run_cli(["-m", "mode=loss", "ckpt=glob:ckpts/step_*", "data=local",
                              f"data.dataset_path={tiny_token_shards}", f"eval.seq_len={SEQ}", "eval.batch_size=4",
                              "eval.steps=-1", f"tracking.uri=sqlite:///{db}", "hydra.sweep.dir=sweep"],
                             cwd=tmp_path, timeout=400)
    assert proc.returncode == 1, proc.stderr[-3000:]  # a job failed: the sweep finished, then says so
    out = proc.stdout
    assert "skipping incomplete checkpoint" in out and "step_500" in out
    assert "sweep summary: 4 job(s), 3 completed, 1 failed" in out and "does not match its architecture" in out
    assert "\n5 checkpoint(s): 3 completed, 1 failed, 1 skipped\n" in out  # the closing line: every match
    skipped_rows = [line for line in out.splitlines() if "step_500" in line and "SKIPPED" in line]
    assert len(skipped_rows) == 1 and skipped_rows[0].split()[:3] == ["-", "step_500", "500"], out

    shards = [np.fromfile(f, dtype=np.uint16) for f in sorted(Path(tiny_token_shards).glob("*.bin"))]
    client, runs = factories.mlflow_runs(db)
    [parent] = [r for r in runs if r.data.tags.get("ckpteval.sweep") == "true"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["loss@100", "loss@1200", "loss@300", "loss@400"]
    assert parent.info.status == "FINISHED"
    assert (parent.data.tags["sweep.jobs"], parent.data.tags["sweep.failed"], parent.data.tags["sweep.skipped"]) \
        == ("4", "1", "1")
    assert "step_500" in parent.data.tags["mlflow.note.content"] and "SKIPPED: " in parent.data.tags["mlflow.note.content"]
    for step in steps:
        run = children[f"loss@{step}"]
        assert run.info.status == "FINISHED"
        [point] = client.get_metric_history(run.info.run_id, "eval/loss")
        model = AutoModelForCausalLM.from_pretrained(ckpts / f"step_{step}", dtype=torch.float32).eval()
        assert point.step == step
        assert point.value == pytest.approx(factories.reference_loss(model, shards, SEQ), abs=1e-4)
    failed = children["loss@400"]
    assert failed.info.status == "FAILED" and "does not match its architecture" in failed.data.tags["error"]

    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert arts == {"summary/summary.csv", "summary/summary.png", "summary/signal.png"}
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "eval/loss")] == [100, 300, 1200]
    csv_rows = (tmp_path / "sweep" / "summary.csv").read_text().splitlines()
    assert len(csv_rows) == 6 and sum(",FAILED," in row for row in csv_rows) == 1
    [skipped] = [row for row in csv_rows if ",SKIPPED," in row]
    assert "step_500" in skipped and "truncated" in skipped
    assert (tmp_path / "sweep" / "summary.png").read_bytes()[:4] == b"\x89PNG"

    # the scan's last lines: the UI command and the link to the curves, whose saved view has the key metrics
    exp_id = parent.info.experiment_id
    assert out.splitlines()[-1] == (f"View: http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType="
                                    "machine_learning&compareRunsMode=CHART&viewStateShareKey=ckpteval")
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in out.splitlines()[-2]
    from ckpteval.tracking.naming import VIEW_TAG

    view = json.loads(json.loads(client.get_experiment(exp_id).tags[VIEW_TAG])["state"])
    assert {"metrics.`eval/loss`", "metrics.`eval/bpb`", "metrics.`eval/perplexity`"} <= set(view["selectedColumns"])


@pytest.mark.slow
def test_multirun_no_match_is_a_loud_error_and_the_parent_run_fails(tmp_path):
    db = tmp_path / "mlflow.db"
    proc = factories.run_cli(["-m", "mode=loss", "ckpt=glob:nowhere/step_*", f"tracking.uri=sqlite:///{db}"],
                             cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "error: glob:nowhere/step_* matches nothing" in proc.stderr and str(tmp_path) in proc.stderr
    _, runs = factories.mlflow_runs(db)
    assert [(r.info.status, "matches nothing" in r.data.tags.get("error", "")) for r in runs] == [("FAILED", True)]

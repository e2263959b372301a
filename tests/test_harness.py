"""`mode=harness` on the project's offline tasks (ckpteval/tasks: multiple choice + loglikelihood_rolling).

References are lm-eval's own: `simple_evaluate` with a plain `HFLM` loaded from the converted HF dir, and the
stock `lm_eval` CLI (backend=subprocess). Also: MLflow read back, the errors that must come before any model
is loaded (unknown task, data not available offline, code-executing task), and the CLI once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ckpteval import app
from tests import factories
from tests.test_convert import make_dcp_checkpoint

from ckpteval.tasks import TASKS_DIR  # noqa: E402 - the offline lm-eval tasks (package data)
TASKS = ["ckpteval_mc", "ckpteval_rolling"]
BATCH = 8
SEED = 1234


def _harness_cfg(tmp: Path, ckpt: Path, *extra: str):
    return factories.compose(["mode=harness", f"ckpt={ckpt}", "harness=offline", f"harness.include_path={TASKS_DIR}",
                              f"harness.batch_size={BATCH}", f"harness.seed={SEED}",
                              f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_tokenizer_dir):
    """A DCP checkpoint, its verified HF conversion, and one in-memory `mode=harness` job on it (backend=hf)."""
    from ckpteval.checkpoint import inspect_checkpoint
    from ckpteval.checkpoint.convert import convert_to_hf

    tmp = tmp_path_factory.mktemp("harness")
    ckpt, _ = make_dcp_checkpoint(tmp / "run", tiny_tokenizer_dir, step=40)
    hf_dir = convert_to_hf(inspect_checkpoint(ckpt), tmp / "hf" / "step_40", None, "float32", 1e-5)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        result = app.main(_harness_cfg(tmp, ckpt, "harness.backend=hf"))
    return {"tmp": tmp, "ckpt": ckpt, "hf_dir": hf_dir, "result": result}


def _reference(hf_dir: Path, limit=None) -> dict:
    """lm-eval alone: a plain HFLM from the HF dir, the same tasks, seeds and batch size."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(hf_dir), batch_size=BATCH, device="cpu", dtype="float32")
    return simple_evaluate(model=lm, tasks=TASKS, limit=limit, log_samples=False,
                           task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                           random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED, fewshot_random_seed=SEED)


def _reference_metrics(ref: dict) -> dict[str, float]:
    out = {}
    for task in TASKS:
        for key, value in ref["results"][task].items():
            if "," in key and isinstance(value, float):
                metric, filt = key.split(",")
                assert filt == "none"
                out[f"harness/{task}/{metric}"] = value
    return out


@pytest.fixture(scope="module")
def reference(evaluated) -> dict[str, float]:
    return _reference_metrics(_reference(evaluated["hf_dir"]))


def test_in_memory_equals_stock_hflm_on_converted_dir(evaluated, reference):
    result = evaluated["result"]
    expected = reference
    assert {"harness/ckpteval_mc/acc", "harness/ckpteval_mc/acc_norm", "harness/ckpteval_mc/acc_stderr",
            "harness/ckpteval_rolling/word_perplexity", "harness/ckpteval_rolling/bits_per_byte"} <= set(expected)
    assert {k: result[k] for k in expected} == expected  # identical, not just close
    # primary: acc_norm for the multiple-choice task, the first listed metric for the rolling one
    assert result["harness/ckpteval_mc/primary"] == expected["harness/ckpteval_mc/acc_norm"]
    assert result["harness/ckpteval_rolling/primary"] == expected["harness/ckpteval_rolling/word_perplexity"]
    # mean_primary averages higher-is-better primaries only (perplexity is not averaged with accuracy)
    assert result["harness/mean_primary"] == expected["harness/ckpteval_mc/acc_norm"]
    assert result["harness/ckpteval_mc/n_samples"] == 40 and result["harness/ckpteval_rolling/n_samples"] == 8
    assert result["step"] == 40 and result["harness/runtime_s"] > 0


def test_mlflow_run_read_back(evaluated):
    result, tmp = evaluated["result"], evaluated["tmp"]
    client, runs = factories.mlflow_runs(tmp / "mlflow.db")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mode"] == "harness" and run.data.tags["step"] == "40"
    assert run.data.tags["mlflow.runName"] == "harness@40"
    assert run.data.tags["harness.primary.ckpteval_mc"] == "acc_norm"
    assert run.data.params["harness.include_path"] == str(TASKS_DIR)
    for key in ("harness/ckpteval_mc/acc_norm", "harness/ckpteval_rolling/word_perplexity", "harness/mean_primary",
                "harness/runtime_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(40, pytest.approx(result[key]))], key
    label = "lm_eval/ckpteval_mc+ckpteval_rolling"
    files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, label)}
    assert {"results.json", "samples_ckpteval_mc.jsonl", "samples_ckpteval_rolling.jsonl"} <= files
    local = Path(client.download_artifacts(run.info.run_id, f"{label}/results.json", str(tmp / "dl")))
    saved = json.loads(local.read_text())
    assert {"config", "versions", "n-samples", "task_hashes", "configs"} <= set(saved)
    assert saved["results"]["ckpteval_mc"]["acc_norm,none"] == result["harness/ckpteval_mc/acc_norm"]
    samples = Path(client.download_artifacts(run.info.run_id, f"{label}/samples_ckpteval_mc.jsonl", str(tmp / "dl")))
    assert len(samples.read_text().splitlines()) == 40


def test_default_fast_backend_gives_the_stock_metrics(evaluated, reference):
    """The default backend (FastLM) end to end: the same accuracies as stock lm-eval, perplexities to 1e-6."""
    tmp = evaluated["tmp"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        result = app.main(_harness_cfg(tmp, evaluated["ckpt"], "tracking.enabled=false"))
    for key, value in reference.items():
        if "ckpteval_mc" in key:
            assert result[key] == value, key
        else:
            assert result[key] == pytest.approx(value, rel=1e-6), key


# ---- errors before any model is loaded -----------------------------------------------------------------

BAD_TASKS = {
    "needs_hub_data.yaml": """task: needs_hub_data
dataset_path: ckpteval-tests/not-on-this-machine
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_choice: ["yes", "no"]
doc_to_target: 0
""",
    "runs_code.yaml": """task: runs_code
dataset_path: ckpteval-tests/code-problems-not-here
output_type: generate_until
test_split: test
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
unsafe_code: true
""",
}


@pytest.fixture()
def bad_tasks(tmp_path, monkeypatch):
    d = tmp_path / "my_tasks"
    d.mkdir()
    for name, text in BAD_TASKS.items():
        (d / name).write_text(text)
    monkeypatch.chdir(tmp_path)

    def never(*a, **k):
        raise AssertionError("the model was loaded before the task check")

    monkeypatch.setattr("ckpteval.modes.harness.load_model", never)
    monkeypatch.setattr("ckpteval.modes.harness.load_tokenizer", never)
    return d


def _expect_error(tmp: Path, overrides: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        app.main(factories.compose(["mode=harness", f"tracking.uri=sqlite:///{tmp}/mlflow.db", *overrides]))
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    _, runs = factories.mlflow_runs(tmp / "mlflow.db")
    assert runs and all(r.info.status == "FAILED" for r in runs)
    return errors[0]


def test_data_not_available_offline(bad_tasks, tiny_hf_ckpt, capsys):
    err = _expect_error(bad_tasks.parent, [f"ckpt={tiny_hf_ckpt}", f"harness.include_path={bad_tasks}",
                                           "harness.tasks=[needs_hub_data]"], capsys)
    assert "needs_hub_data" in err and "ckpteval-tests/not-on-this-machine" in err
    assert "not available offline" in err and "HF_DATASETS_CACHE" in err and "harness.include_path" in err


def test_code_executing_task_refused_unless_allowed(bad_tasks, tiny_hf_ckpt, capsys):
    base = [f"ckpt={tiny_hf_ckpt}", f"harness.include_path={bad_tasks}", "harness.tasks=[runs_code]"]
    err = _expect_error(bad_tasks.parent, base, capsys)
    assert "runs_code" in err and "harness.allow_code_execution=true" in err
    allowed = _expect_error(bad_tasks.parent, [*base, "harness.allow_code_execution=true"], capsys)
    assert "code-problems-not-here" in allowed  # past the refusal: now it is the (missing) data


def test_unknown_task_lists_close_matches(bad_tasks, tiny_hf_ckpt, capsys):
    err = _expect_error(bad_tasks.parent, [f"ckpt={tiny_hf_ckpt}", f"harness.include_path={TASKS_DIR}",
                                           "harness.tasks=[helaswag,ckpteval_mcq]"], capsys)
    assert "unknown lm-eval task" in err
    assert "'helaswag' (did you mean: hellaswag" in err and "'ckpteval_mcq' (did you mean: ckpteval_mc" in err


# ---- the CLI, with the stock lm_eval CLI as backend --------------------------------------------------------

@pytest.mark.slow
def test_cli_subprocess_backend_equals_in_memory_and_reuses_conversion(evaluated, tmp_path):
    """`python run.py mode=harness harness.backend=subprocess` on the DCP checkpoint: converted once into the
    cache, `lm_eval` run in a clean process, same numbers as the in-memory path, same MLflow/results contract."""
    from ckpteval.checkpoint import inspect_checkpoint
    from ckpteval.modes.harness import converted_checkpoint

    ckpt, db, run_dir, cache = evaluated["ckpt"], tmp_path / "mlflow.db", tmp_path / "run", tmp_path / "cache"
    args = ["mode=harness", f"ckpt={ckpt}", "harness=offline", f"harness.include_path={TASKS_DIR}",
            f"harness.batch_size={BATCH}", "harness.backend=subprocess", f"harness.cache_dir={cache}",
            f"tracking.uri=sqlite:///{db}", f"hydra.run.dir={run_dir}"]
    proc = factories.run_cli(args, cwd=tmp_path, env={"OMP_NUM_THREADS": str(os.cpu_count())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = factories.last_json_line(proc.stdout)
    expected = evaluated["result"]
    keys = [k for k in expected if k.startswith("harness/ckpteval") or k == "harness/mean_primary"]
    assert {k: line[k] for k in keys} == {k: expected[k] for k in keys}
    assert line["step"] == 40 and "|ckpteval_mc" in proc.stdout  # lm-eval's results table
    assert json.loads((run_dir / "results.json").read_text()) == line
    assert (run_dir / "lm_eval" / "step_40" / "ckpteval_mc+ckpteval_rolling" / "results.json").is_file()
    _, runs = factories.mlflow_runs(db)
    assert [r.info.status for r in runs] == ["FINISHED"]

    (converted,) = list(cache.iterdir())  # converted once, keyed by checkpoint identity
    record = json.loads((converted / "ckpteval_source.json").read_text())
    assert record["source_path"] == str(ckpt.resolve()) and record["max_abs_diff"] <= 1e-5
    before = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    cfg = factories.compose(args[:-2])
    again, _ = converted_checkpoint(cfg, cfg.harness, inspect_checkpoint(ckpt))
    assert again == converted and {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == before


def test_include_path_tasks_that_import_python_are_named_once(caplog):
    """`!function` in an include_path task YAML runs that Python file: the log names it (WARNING) before it runs,
    once per file per process."""
    from omegaconf import OmegaConf

    from ckpteval.evaluation import harness as harness_eval

    harness_eval._NOTICED.clear()
    from ckpteval.config import HarnessConfig

    hcfg = OmegaConf.structured(HarnessConfig(tasks=["ckpteval_mc", "ckpteval_rolling"], include_path=str(TASKS_DIR)))
    harness_eval._RESOLVED.clear()  # resolved tasks are kept per process: resolve afresh so the notice can show
    with caplog.at_level("WARNING", logger="ckpteval.evaluation.harness"):
        harness_eval.resolve_tasks(hcfg)
        harness_eval.resolve_tasks(hcfg)
    notices = [r.getMessage() for r in caplog.records if "imports Python" in r.getMessage()]
    assert len(notices) == 2, notices
    assert any("ckpteval_mc.yaml" in n and "ckpteval_offline_data.load_mc" in n for n in notices)
    assert any("ckpteval_rolling.yaml" in n and "ckpteval_offline_data.load_rolling" in n for n in notices)


# ---- once per scan: requests built once for checkpoints sharing tasks and tokenizer ------------------------

def test_request_cache_reused_across_checkpoints(evaluated, tiny_hf_ckpt, tmp_path, monkeypatch):
    """Two checkpoints, same tasks and tokenizer: lm-eval builds the requests for the first only; a new process
    (memory cleared) reads them from harness.request_cache_dir; metrics equal a run without any cache."""
    from lm_eval.api.task import ConfigurableTask

    from ckpteval.evaluation import harness as glue
    from ckpteval.evaluation import request_cache

    built: list[str] = []  # one entry per document lm-eval turns into requests
    original = ConfigurableTask.construct_requests
    monkeypatch.setattr(ConfigurableTask, "construct_requests",
                        lambda self, *a, **k: built.append(self.config.task) or original(self, *a, **k))
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "requests"
    common = ["tracking.enabled=false", f"harness.request_cache_dir={cache}"]
    glue._RESOLVED.clear()
    request_cache._built.clear()
    app.main(_harness_cfg(tmp_path, evaluated["ckpt"], *common))
    n_built = len(built)
    assert n_built == 48 and len(list(cache.glob("*.json"))) == 2  # 40 MC + 8 rolling documents
    second = app.main(_harness_cfg(tmp_path, tiny_hf_ckpt, *common))
    assert len(built) == n_built, "requests were rebuilt for the second checkpoint"
    assert "harness/overhead_s" in second

    glue._RESOLVED.clear()  # as in a new process
    request_cache._built.clear()
    disk_before = request_cache.stats["reused_disk"]
    from_disk = app.main(_harness_cfg(tmp_path, tiny_hf_ckpt, *common))
    assert len(built) == n_built and request_cache.stats["reused_disk"] == disk_before + 2

    fresh = app.main(_harness_cfg(tmp_path, tiny_hf_ckpt, "tracking.enabled=false", "harness.request_cache=false"))
    assert len(built) == 2 * n_built
    keys = [k for k in fresh if k.startswith("harness/ckpteval") or k == "harness/mean_primary"]
    assert keys and {k: second[k] for k in keys} == {k: fresh[k] for k in keys} == {k: from_disk[k] for k in keys}


def test_printed_table_is_lm_evals_make_table():
    """The job's printed table is rendered by ckpteval (lm-eval's `make_table` also fills a LaTeX table it never
    prints, ~30-50 ms a job); it must be the table lm-eval prints, row for row, for groups, subtasks under them,
    aliases, integer-valued versions, "N/A" and absent stderrs, metrics without a direction."""
    from lm_eval.utils import make_table

    from ckpteval.evaluation.harness import results_table

    def task(alias, **metrics):
        return {"alias": alias, "name": alias.strip(" -"), "sample_len": 10, **metrics}

    results = {
        "results": {
            "suite": task("suite", **{"acc,none": 0.5, "acc_stderr,none": "N/A"}),
            "suite_a": task(" - suite_a", **{"acc,none": 0.25, "acc_stderr,none": 0.125, "acc_norm,none": 0.375,
                                             "acc_norm_stderr,none": 0.0625}),
            "suite_b": task(" - suite_b", **{"exact_match,strict-match": 0.1234567, "exact_match_stderr,strict-match":
                                             0.01, "exact_match,flexible": 0.5}),
            "alone": task("alone", **{"word_perplexity,none": 56368359.47051, "bits_per_byte,none": 4.4265,
                                      "bits_per_byte_stderr,none": "N/A", "count,none": 7}),
        },
        "groups": {"suite": {"alias": "suite", "acc,none": 0.5, "acc_stderr,none": "N/A"}},
        "group_subtasks": {"suite": ["suite_b", "suite_a"], "alone": []},
        "versions": {"suite": 1.0, "suite_a": 2.0, "suite_b": 1.5, "alone": "v3"},
        "n-shot": {"suite_a": 5, "suite_b": 0, "alone": 0},
        "higher_is_better": {"suite_a": {"acc": True, "acc_norm": True}, "suite_b": {"exact_match": True},
                             "alone": {"word_perplexity": False, "bits_per_byte": False}},
    }
    def cells(text: str) -> list[list]:  # a number as its value (lm-eval's writer pads a column's decimals)
        def cell(c: str):
            try:
                return float(c)
            except ValueError:
                return c.strip()

        return [[cell(c) for c in row.split("|")[1:-1]] for row in text.splitlines() if not row.startswith("|-")]

    ours = results_table(results)
    assert cells(ours) == cells(make_table(results) + "\n" + make_table(results, "groups"))
    assert [len(r) for r in cells(ours)] == [9] * 9 + [0] + [9] * 2  # tasks (8 rows), a blank line, groups
    assert len({len(line) for line in ours.splitlines()[:10]}) == 1  # columns aligned
    flat = {k: v for k, v in results.items() if k not in ("groups", "group_subtasks")}
    flat["results"] = {"alone": results["results"]["alone"]}
    assert cells(results_table(flat)) == cells(make_table(flat))

"""Bad input, table-driven: every case ends with exit 2, exactly one `error:` line naming the problem and the fix,
no traceback, no MLflow run left RUNNING or FINISHED, no results.json, and bounded memory.

Most cases run in-process (`app.main(factories.compose([...]))`, fast); a few go through the real CLI. Choices
(dtype, parallel name, data kind, ...) are Enums in the structured config: they fail earlier, at compose time,
with Hydra's message naming the key and the valid values (second table).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from ckpteval import app
from tests import factories

SEQ = 32
PEAK_RSS_GB = 4.0
# A CUDA device this machine lacks: plain `cuda` on a CPU-only torch build (the common case), else one past the last.
_NO_CUDA = "cuda" if not __import__("torch").cuda.is_available() else f"cuda:{__import__('torch').cuda.device_count()}"  # a tiny model and tiny data: anything near this means something allocated before validating


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _data(shards) -> list[str]:
    return ["data=local", f"data.dataset_path={shards}", f"eval.seq_len={SEQ}", "eval.batch_size=2", "eval.steps=1"]


def _file(tmp: Path, name: str, content: bytes = b"not a database, just bytes\n") -> Path:
    path = tmp / name
    path.write_bytes(content)
    return path


def _jsonl(tmp: Path) -> Path:
    return _file(tmp, "docs.jsonl", b"".join(json.dumps({"text": f"document {i}"}).encode() + b"\n" for i in range(20)))


def _hf_dataset(tmp: Path) -> Path:
    from datasets import Dataset, DatasetDict

    DatasetDict({"validation": Dataset.from_dict({"text": ["hello world"] * 20})}).save_to_disk(tmp / "ds")
    return tmp / "ds"


# (id, overrides(tmp, ckpt, shards) -> list[str], words the error line must contain)
# Each case's words name the problem (the key or thing) and the fix (a value or a command to use).
CASES = [
    ("batch_size_zero", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.batch_size=0"],
     ["eval.batch_size=0", "1 or more"]),
    ("batch_size_negative", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.batch_size=-4"],
     ["eval.batch_size=-4", "1 or more"]),
    ("batch_size_word", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.batch_size=abc"],
     ["eval.batch_size=abc", "eval.batch_size=auto"]),  # an int or auto: checked after composing (see auto_batch)
    ("seq_len_zero", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.seq_len=0"],
     ["eval.seq_len=0", "1 or more"]),
    ("seq_len_beyond_positions", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.seq_len=300"],
     ["max_position_embeddings", "eval.seq_len=256"]),
    ("logits_chunk_negative", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.logits_chunk=-1"],
     ["eval.logits_chunk=-1", "0 (auto)"]),
    ("steps_zero", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.steps=0"],
     ["eval.steps=0", "-1"]),
    ("steps_minus_two", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.steps=-2"],
     ["eval.steps=-2", "-1"]),
    ("interval_zero", lambda t, c, s: ["mode=train_eval", "eval.interval=0"], ["eval.interval=0", "1 or more"]),
    ("doc_sep_negative", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.doc_mask=true",
                                          "eval.doc_sep_id=-5"], ["eval.doc_sep_id=-5", "token id"]),
    ("doc_sep_outside_vocab", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.doc_mask=true",
                                               "eval.doc_sep_id=100000"], ["eval.doc_sep_id=100000", "vocabulary"]),
    ("train_steps_zero", lambda t, c, s: ["mode=train_eval", "train.steps=0"], ["train.steps=0", "1 or more"]),
    ("train_lr_zero", lambda t, c, s: ["mode=train_eval", "train.lr=0"], ["train.lr=0", "positive"]),
    ("train_grad_accum_zero", lambda t, c, s: ["mode=train_eval", "train.grad_accum=0"],
     ["train.grad_accum=0", "1 or more"]),
    ("train_batch_zero", lambda t, c, s: ["mode=train_eval", "train.batch_size=0"],
     ["train.batch_size=0", "1 or more"]),
    ("train_min_lr_ratio", lambda t, c, s: ["mode=train_eval", "train.min_lr_ratio=2.0"],
     ["train.min_lr_ratio=2.0", "between 0 and 1"]),
    ("train_warmup_negative", lambda t, c, s: ["mode=train_eval", "train.warmup_steps=-1"],
     ["train.warmup_steps=-1", "0 or more"]),
    ("keep_last_negative", lambda t, c, s: ["mode=train_eval", "checkpoint.keep_last=-1"],
     ["checkpoint.keep_last=-1", "0 (keep all)"]),
    ("harness_limit_negative", lambda t, c, s: ["mode=harness", f"ckpt={c}", "harness.limit=-3"],
     ["harness.limit=-3", "positive"]),
    ("harness_batch_zero", lambda t, c, s: ["mode=harness", f"ckpt={c}", "harness.batch_size=0"],
     ["harness.batch_size=0", "1 or more"]),
    ("harness_fewshot_negative", lambda t, c, s: ["mode=harness", f"ckpt={c}", "harness.num_fewshot=-1"],
     ["harness.num_fewshot=-1", "0 or more"]),
    ("harness_no_tasks", lambda t, c, s: ["mode=harness", f"ckpt={c}", "harness.tasks=[]"],
     ["harness.tasks is empty", "harness.tasks=[arc_easy]"]),
    ("harness_include_path_missing", lambda t, c, s: ["mode=harness", f"ckpt={c}", f"harness.include_path={t}/no",
                                                      "harness.tasks=[x]"], ["harness.include_path", "does not exist"]),
    ("microbatches_zero", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "parallel.microbatches=0"],
     ["parallel.microbatches=0", "1 or more"]),
    ("tp_zero", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "parallel.tp=0"], ["parallel.tp=0", "1 or"]),
    ("fsdp_without_torchrun", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "parallel=fsdp"],
     ["parallel=fsdp", "torchrun"]),
    ("num_proc_zero", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "data.num_proc=0"],
     ["data.num_proc=0", "1 or more"]),
    ("device_cuda_missing", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), f"eval.device={_NO_CUDA}"],
     [f"eval.device={_NO_CUDA}", "cpu"]),
    ("device_cuda_index", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.device=cuda:3"],
     ["eval.device=cuda:3", "eval.device=cpu"]),
    ("device_not_a_device", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.device=gpu"],
     ["eval.device=gpu", "cpu, cuda"]),
    ("device_meta", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.device=meta"],
     ["eval.device=meta", "cpu, cuda"]),
    ("store_not_a_database", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s),
                                              f"tracking.uri=sqlite:///{_file(t, 'notdb.db')}"],
     ["is not an sqlite database", "tracking.uri"]),
    ("store_under_a_file", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s),
                                            f"tracking.uri=sqlite:///{_file(t, 'afile')}/sub/mlflow.db"],
     ["not a directory", "tracking.uri"]),
    ("store_is_a_directory", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), f"tracking.uri=sqlite:///{t}"],
     ["is a directory", "tracking.uri=sqlite:///"]),
    ("store_server_unreachable", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s),
                                                  "tracking.uri=http://127.0.0.1:9", "tracking.timeout_s=2"],
     ["unreachable", "tracking.uri"]),
    ("tracking_timeout_zero", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "tracking.timeout_s=0"],
     ["tracking.timeout_s=0", "positive"]),
    ("outbox_under_a_file", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s),
                                             f"tracking.outbox={_file(t, 'obfile')}/box"],
     ["tracking outbox", "tracking.outbox=DIR"]),
    ("no_ckpt", lambda t, c, s: ["mode=loss", *_data(s)], ["needs a checkpoint", "ckpt=PATH"]),
    ("ckpt_missing", lambda t, c, s: ["mode=loss", f"ckpt={t}/nope", *_data(s)], ["does not exist"]),
    ("ckpt_glob_without_m", lambda t, c, s: ["mode=loss", f"ckpt=glob:{t}/step_*", *_data(s)], ["pattern", "-m"]),
    ("data_dir_missing", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), f"data.dataset_path={t}/none"],
     ["does not exist"]),
    ("data_no_files_match", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "data.file_pattern=*.tokens"],
     ["*.tokens"]),
    ("data_ids_beyond_vocab", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s),
                                               f"data.dataset_path={factories.make_token_shards(t / 'big', (400,), vocab=60000)}"],
     ["vocab"]),
    ("hf_split_missing", lambda t, c, s: ["mode=loss", f"ckpt={c}", "data=hf", f"data.name={_hf_dataset(t)}",
                                          "data.split=test", f"eval.seq_len={SEQ}"], ["no split 'test'", "data.split"]),
    ("hf_single_file_split", lambda t, c, s: ["mode=loss", f"ckpt={c}", "data=hf", f"data.name={_jsonl(t)}",
                                              "data.split=test", f"eval.seq_len={SEQ}"], ["no split 'test'", "data.split"]),
    ("hf_dataset_missing", lambda t, c, s: ["mode=loss", f"ckpt={c}", "data=hf", f"data.name={t}/missing_ds",
                                            f"eval.seq_len={SEQ}"], ["not available offline"]),
    ("prepare_val_fraction", lambda t, c, s: ["mode=prepare", "prepare.val_fraction=1.5"],
     ["prepare.val_fraction=1.5", "between 0 and 1"]),
    ("watch_without_dir", lambda t, c, s: ["mode=watch", "watch.once=true"], ["watch.dir=PATH"]),
]


def _assert_one_error(code, err: str, words: list[str]) -> None:
    assert code == 2, (code, err[-2000:])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert "Traceback" not in err, err[-3000:]


def _assert_nothing_half_written(tmp: Path) -> None:
    assert not list(tmp.rglob("results.json")), list(tmp.rglob("results.json"))
    for db in tmp.rglob("*.db"):
        if db.read_bytes()[:15] != b"SQLite format 3":
            continue
        _, runs = factories.mlflow_runs(db)
        assert all(r.info.status not in ("RUNNING", "FINISHED") for r in runs), [r.info.status for r in runs]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(case, in_tmp, tiny_hf_ckpt, tiny_token_shards, capsys):
    _, overrides, words = case
    args = overrides(in_tmp, tiny_hf_ckpt, tiny_token_shards)
    if not any(a.startswith("tracking.uri=") for a in args):
        args.append(f"tracking.uri=sqlite:///{in_tmp}/mlflow.db")
    args += [f"paths.outputs={in_tmp}/outputs", "hydra.run.dir=."]
    cfg = factories.compose(args)
    with pytest.raises(SystemExit) as exc:
        app.main(cfg)
    _assert_one_error(exc.value.code, capsys.readouterr().err, words)
    _assert_nothing_half_written(in_tmp)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 < PEAK_RSS_GB


def test_the_table_has_at_least_40_cases():
    assert len(CASES) + len(COMPOSE_CASES) >= 40 and len(CASES) >= 40


# Choices are Enums: a wrong one fails while composing, naming the key and the valid values.
COMPOSE_CASES = [
    ("eval.dtype=float64", "float32"),
    ("train.dtype=int8", "bfloat16"),
    ("parallel.name=zero", "fsdp"),
    ("data.kind=s3", "local"),
    ("data.dtype=float8", "uint16"),
    ("harness.backend=vllm", "subprocess"),
    ("harness.dtype=float64", "float32"),
    ("watch.order=random", "newest"),
    ("convert.dtype=int4", "bfloat16"),
    ("parallel.pp_schedule=Zigzag", "GPipe"),
    ("parallel.param_dtype=fp8", "bfloat16"),
    ("mode.name=bogus", "train_eval"),
    ("watch.plan=[loss,mmlu]", "harness"),
]


@pytest.mark.parametrize("override,valid", COMPOSE_CASES)
def test_bad_choice_fails_at_compose_time(override, valid):
    with pytest.raises(ConfigCompositionException) as exc:
        factories.compose(["mode=loss", override])
    text = f"{exc.value} {exc.value.__cause__}"
    assert override.split("=")[0].split(".")[-1] in text and valid in text, text


# ---- through the real CLI: the same contract from a shell -------------------------------------------------

CLI_CASES = [
    ("batch_size_zero", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), "eval.batch_size=0"],
     ["eval.batch_size=0"]),
    ("device_cuda", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s), f"eval.device={_NO_CUDA}"],
     [f"eval.device={_NO_CUDA}"]),
    ("store_not_a_database", lambda t, c, s: ["mode=loss", f"ckpt={c}", *_data(s),
                                              f"tracking.uri=sqlite:///{_file(t, 'x.db')}"], ["not an sqlite"]),
    # composition errors (Hydra's) become the same one line and exit 2 (ckpteval/cli_errors.py)
    ("enum_choice", lambda t, c, s: ["mode=loss", "eval.dtype=float64"], ["eval.dtype=float64", "bfloat16"]),
    ("key_typo", lambda t, c, s: ["mode=loss", "eval.stpes=3"], ["eval.stpes", "+eval.stpes=3"]),
    ("wrong_type", lambda t, c, s: ["mode=loss", "eval.steps=abc"], ["eval.steps=abc", "Integer"]),
    ("unknown_group_option", lambda t, c, s: ["parallel=zzz"], ["parallel/zzz", "fsdp none pp tp"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_input_on_the_cli(case, tmp_path, tiny_hf_ckpt, tiny_token_shards):
    _, overrides, words = case
    args = overrides(tmp_path, tiny_hf_ckpt, tiny_token_shards)
    if not any(a.startswith("tracking.uri=") for a in args):
        args.append(f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    proc = factories.run_cli(args, cwd=tmp_path, timeout=120)
    _assert_one_error(proc.returncode, proc.stderr, words)
    _assert_nothing_half_written(tmp_path)


@pytest.mark.slow
def test_read_only_store_fails_fast_with_one_line(tmp_path, tiny_hf_ckpt, tiny_token_shards):
    """A store on a read-only mount (made with a private mount namespace: needs unshare + mount rights)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {ro} -o ro"], capture_output=True,
                           check=False) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("this machine cannot make a read-only mount (unshare -m + mount need CAP_SYS_ADMIN)")
    import shlex
    import sys

    args = ["mode=loss", f"ckpt={tiny_hf_ckpt}", *_data(tiny_token_shards), f"tracking.uri=sqlite:///{ro}/mlflow.db"]
    cmd = f"mount -t tmpfs none {ro} -o ro && exec {shlex.quote(sys.executable)} {factories.REPO / 'run.py'} " + \
        " ".join(shlex.quote(a) for a in args)
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    _assert_one_error(proc.returncode, proc.stderr, ["read-only", "tracking.uri"])
    assert not list(tmp_path.rglob("results.json"))


def test_results_json_only_after_the_run_is_finished(in_tmp, tiny_hf_ckpt, tiny_token_shards):
    """The good path of the same runner: results.json in the run dir, its run FINISHED, no staging left."""
    cfg = factories.compose(["mode=loss", f"ckpt={tiny_hf_ckpt}", *_data(tiny_token_shards),
                             f"tracking.uri=sqlite:///{in_tmp}/mlflow.db", f"paths.outputs={in_tmp}/outputs"])
    result = app.main(cfg)
    saved = json.loads((in_tmp / "results.json").read_text())
    assert saved["eval/loss"] == pytest.approx(result["eval/loss"])
    assert not (in_tmp / ".pending").exists()
    _, runs = factories.mlflow_runs(in_tmp / "mlflow.db")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert not list((in_tmp / "outputs" / "tracking_outbox" / "running").glob("*.json"))

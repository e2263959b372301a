"""`mode=train_eval`: in-loop evaluation equals `mode=loss` on the saved checkpoint, exact resume, atomic
checkpoints, the stdout line format, MLflow metrics at the right steps, and the demo on the embedded default."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest

from ckpteval import app
from tests import factories

MODEL = ["model.vocab_size=512", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
         "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.max_position_embeddings=64"]
EVAL = ["eval.seq_len=16", "eval.batch_size=4", "eval.steps=3", "eval.interval=3"]


@pytest.fixture()
def setup(tmp_path, monkeypatch, tiny_tokenizer_dir):
    monkeypatch.chdir(tmp_path)
    train = factories.make_token_shards(tmp_path / "train", lengths=(3000,), seed=1)
    val = factories.make_token_shards(tmp_path / "val", lengths=(200,), seed=2)
    return tmp_path, train, val, tiny_tokenizer_dir


def _train_cfg(tmp: Path, train: Path, val: Path, tok: Path, ckpts: Path, *extra: str):
    return factories.compose(["mode=train_eval", "data=local", f"data.train_path={train}",
                              f"data.dataset_path={val}", f"tokenizer={tok}", *MODEL, *EVAL, "train.steps=6",
                              "train.batch_size=4", "train.seq_len=16", "train.warmup_steps=2", "train.log_interval=1",
                              "checkpoint.interval=3", f"checkpoint.dir={ckpts}",
                              f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra])


def _history(db: Path, run_name: str | None, key: str) -> dict[int, float]:
    client, runs = factories.mlflow_runs(db)
    runs = [r for r in runs if run_name is None or r.data.tags.get("mlflow.runName") == run_name]
    runs.sort(key=lambda r: r.info.start_time)
    return {m.step: m.value for m in client.get_metric_history(runs[-1].info.run_id, key)}


def test_in_loop_eval_equals_mode_loss_and_stdout_format(setup, capsys):
    tmp, train, val, tok = setup
    ckpts = tmp / "ckpts"
    seen_incomplete: list[str] = []
    stop = threading.Event()

    def watch_dirs():  # a watcher must never see a step dir without its .metadata
        while not stop.is_set():
            for d in ckpts.glob("step_*") if ckpts.exists() else []:
                if not (d / ".metadata").exists():
                    seen_incomplete.append(d.name)
            stop.wait(0.002)

    poller = threading.Thread(target=watch_dirs, daemon=True)
    poller.start()
    try:
        result = app.main(_train_cfg(tmp, train, val, tok, ckpts))
    finally:
        stop.set()
        poller.join()
    out = capsys.readouterr().out
    assert not seen_incomplete
    lines = re.findall(r"^\[step (\d+)\] eval/loss=(\d+\.\d{4}) \| eval/perplexity=(\d+\.\d{4})$", out, re.M)
    assert [int(s) for s, _, _ in lines] == [3, 6]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_3", "step_6"]
    for step_dir in ckpts.iterdir():
        names = {p.name for p in step_dir.iterdir()}
        assert {".metadata", "config.json", "tokenizer.json", "ckpteval.json"} <= names
    meta = json.loads((ckpts / "step_3" / "ckpteval.json").read_text())
    assert meta["step"] == 3 and meta["tokens_seen"] == 3 * 4 * 16 and meta["data_position"] == 12

    db = tmp / "mlflow.db"
    in_loop = _history(db, None, "eval/loss")
    assert sorted(in_loop) == [3, 6]
    assert sorted(_history(db, None, "train/loss")) == [1, 2, 3, 4, 5, 6]
    assert result["step"] == 6 and result["eval/loss"] == pytest.approx(in_loop[6])
    assert result["eval/tokens"] == 3 * 4 * 16

    for step in (3, 6):  # the same number from a standalone evaluation of the saved checkpoint
        standalone = app.main(factories.compose(["mode=loss", f"ckpt={ckpts / f'step_{step}'}", "data=local",
                                                 f"data.dataset_path={val}", *EVAL,
                                                 f"tracking.uri=sqlite:///{tmp}/mlflow.db"]))
        assert standalone["step"] == step
        assert standalone["tokens_seen"] == step * 4 * 16
        assert abs(standalone["eval/loss"] - in_loop[step]) < 1e-5


def test_resume_reproduces_uninterrupted_losses(setup):
    tmp, train, val, tok = setup
    app.main(_train_cfg(tmp, train, val, tok, tmp / "a", "tracking.run_name=full"))
    full = _history(tmp / "mlflow.db", "full", "train/loss")

    app.main(_train_cfg(tmp, train, val, tok, tmp / "b", "train.steps=6", "tracking.run_name=first"))
    shutil.rmtree(tmp / "b" / "step_6")  # as if the job died after step_3 was saved
    app.main(_train_cfg(tmp, train, val, tok, tmp / "b", "checkpoint.resume=true", "tracking.run_name=resumed"))
    resumed = _history(tmp / "mlflow.db", "resumed", "train/loss")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6)
    eval_full = _history(tmp / "mlflow.db", "full", "eval/loss")
    eval_resumed = _history(tmp / "mlflow.db", "resumed", "eval/loss")
    assert eval_resumed[6] == pytest.approx(eval_full[6], abs=1e-6)


def test_bf16_autocast_and_grad_accum_train(setup):
    tmp, train, val, tok = setup
    result = app.main(_train_cfg(tmp, train, val, tok, tmp / "c", "train.dtype=bfloat16", "train.grad_accum=2",
                                 "checkpoint.interval=0"))
    assert result["step"] == 6 and result["tokens_seen"] == 6 * 2 * 4 * 16
    assert sorted(p.name for p in (tmp / "c").iterdir()) == ["step_6"]


@pytest.mark.slow
def test_demo_default_runs_and_loss_falls(tmp_path):
    """The README's main job, shortened: builds the demo corpus from the stdlib, trains, evaluates, saves."""
    proc = factories.run_cli(["train.steps=40", "eval.interval=20", "eval.steps=4", "train.warmup_steps=5",
                              "prepare.max_chars=400000", "checkpoint.interval=20"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^\[step \d+\] eval/loss=(\d+\.\d+)", proc.stdout, re.M)]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert "python run.py mode=loss ckpt=" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout
    assert (tmp_path / "outputs" / "demo_corpus" / "tokenizer" / "tokenizer.json").exists()
    assert list((tmp_path / "outputs" / "train_eval").glob("*/checkpoints/step_40/.metadata"))


@pytest.mark.slow
def test_every_next_command_runs_offline_as_printed(setup, capsys):
    """The "Next:" commands train_eval prints run, exactly as printed, with no network (HF_HUB_OFFLINE=1)."""
    import shlex

    tmp, train, val, tok = setup
    app.main(_train_cfg(tmp, train, val, tok, tmp / "ckpts"))
    out = capsys.readouterr().out
    assert re.search(r"^\[step 6\] train/loss=\d+\.\d{4} \| lr=\S+ \| tokens/s=\S+ \| eta 0:00:00$", out, re.M), out
    block = out.split("\nNext:\n", 1)[1]
    commands = [line.strip().split("    #")[0] for line in block.splitlines() if line.strip().startswith("python run.py")]
    assert len(commands) == 2 and "mode=harness" in commands[1] and "harness=offline" in commands[1]
    for command in commands:
        args = shlex.split(command)[2:]  # after "python run.py"
        proc = factories.run_cli(args, cwd=tmp, timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        assert factories.last_json_line(proc.stdout), command
        assert "results: " in proc.stdout

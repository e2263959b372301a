"""parallel=fsdp|tp|pp: mesh validation (unit), and under `torchrun --nproc_per_node=2` (gloo, CPU) the loss of
every layout against the plain transformers reference and parallel=none, for eval.steps fixed and -1, for an HF
checkpoint and for a DCP checkpoint written by a 2-rank FSDP training run; FSDP training against single-process
training; FSDP resume; every rank failing together with one message.

Two launches keep this fast: the real CLI (`torchrun ... run.py mode=train_eval parallel=fsdp`), then this file
run as a module under torchrun (`_driver`), which runs many jobs through `app.main` in one process group launch
and writes each rank's results to JSON for the assertions below.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ckpteval.errors import CkptEvalError
from ckpteval.parallel.mesh import check_microbatches, check_model_fits, resolve_mesh_dims, split_layers
from tests import factories

SEQ = 32  # HF checkpoint: 55 windows of 32 (shards of 1000 and 777 tokens)
TRAIN_MODEL = ["model.vocab_size=512", "model.hidden_size=32", "model.intermediate_size=64",
               "model.num_hidden_layers=3", "model.num_attention_heads=4", "model.num_key_value_heads=2",
               "model.max_position_embeddings=64"]
TOL = 1e-5


# ------------------------------------------------------------------------------------------------ unit: mesh


def _pcfg(name="none", dp=-1, tp=1, pp=1):
    return SimpleNamespace(name=name, dp=dp, tp=tp, pp=pp)


def test_mesh_dims_inferred_and_validated():
    assert resolve_mesh_dims(_pcfg("fsdp"), 4).shape == (4, 1, 1)
    assert resolve_mesh_dims(_pcfg("tp", tp=2), 4).shape == (2, 1, 2)
    assert resolve_mesh_dims(_pcfg("pp", pp=2, dp=3), 6).shape == (3, 2, 1)
    with pytest.raises(CkptEvalError, match=r"world size 3 is not divisible by parallel.tp=2 x parallel.pp=1"):
        resolve_mesh_dims(_pcfg("tp", tp=2), 3)
    with pytest.raises(CkptEvalError, match=r"parallel.dp=3 x parallel.tp=2 x parallel.pp=1 = 6 does not match "
                                            r"the world size 4"):
        resolve_mesh_dims(_pcfg("tp", tp=2, dp=3), 4)
    with pytest.raises(CkptEvalError, match=r"parallel.pp=2 does not apply to parallel=fsdp"):
        resolve_mesh_dims(_pcfg("fsdp", pp=2), 2)
    with pytest.raises(CkptEvalError, match=r"parallel=zero is unknown"):
        resolve_mesh_dims(_pcfg("zero"), 2)
    with pytest.raises(CkptEvalError, match=r"must be >= 1"):
        resolve_mesh_dims(_pcfg("tp", tp=0), 2)


def test_model_must_split_evenly():
    config = factories.llama_config(layers=2, hidden=64, heads=4, kv_heads=2)  # intermediate 144
    check_model_fits(resolve_mesh_dims(_pcfg("tp", tp=2), 2), config)
    with pytest.raises(CkptEvalError, match=r"parallel.tp=4 does not divide the model's num_key_value_heads=2"):
        check_model_fits(resolve_mesh_dims(_pcfg("tp", tp=4), 4), config)
    with pytest.raises(CkptEvalError, match=r"parallel.tp=3 does not divide the model's num_attention_heads=4"):
        check_model_fits(resolve_mesh_dims(_pcfg("tp", tp=3), 3), config)
    odd = factories.llama_config(hidden=64, heads=4, kv_heads=4)
    odd.intermediate_size = 146
    with pytest.raises(CkptEvalError, match=r"does not divide the model's intermediate_size=146"):
        check_model_fits(resolve_mesh_dims(_pcfg("tp", tp=4), 4), odd)
    with pytest.raises(CkptEvalError, match=r"parallel.pp=4 pipeline stages but the model has only "
                                            r"num_hidden_layers=2"):
        check_model_fits(resolve_mesh_dims(_pcfg("pp", pp=4), 4), config)
    with pytest.raises(CkptEvalError, match=r"eval.batch_size=6 is not divisible by parallel.microbatches=4"):
        check_microbatches(6, 4)
    assert split_layers(5, 2) == [range(3), range(3, 5)]


def test_layout_without_torchrun_is_a_clear_error(tmp_path, monkeypatch, tiny_hf_ckpt, tiny_token_shards):
    from ckpteval import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = factories.compose(["mode=loss", f"ckpt={tiny_hf_ckpt}", "parallel=fsdp", "data=local",
                             f"data.dataset_path={tiny_token_shards}", "tracking.enabled=false"])
    with pytest.raises(SystemExit) as exc:
        app.main(cfg)
    assert exc.value.code == 2


# ------------------------------------------------------------------------------------------------ torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}"]


def _shards(path: Path) -> list[np.ndarray]:
    return [np.fromfile(f, dtype=np.uint16) for f in sorted(path.glob("*.bin"))]


def _hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _dcp_model(path: Path):
    """Independent reader: torch DCP straight into a plain transformers model ("model." = trainer's entry)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    return model.eval()


def _window_ids(n: int, batch: int, steps: int, dp: int) -> list[int] | None:
    return None if steps == -1 else [i % n for i in range(steps * batch * dp)]


def _train_args(tmp: Path, *extra: str) -> list[str]:
    return ["mode=train_eval", "data=local", f"data.train_path={tmp / 'train'}", f"data.dataset_path={tmp / 'val'}",
            f"tokenizer={tmp / 'tok'}", *TRAIN_MODEL, "eval.seq_len=16", "eval.steps=3", "eval.interval=3",
            "train.steps=6", "train.seq_len=16", "train.warmup_steps=2", "train.log_interval=1",
            "checkpoint.interval=3", f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra]


def _history(tmp: Path, run_name: str, key: str) -> dict[int, float]:
    client, runs = factories.mlflow_runs(tmp / "mlflow.db")
    run = [r for r in runs if r.data.tags.get("mlflow.runName") == run_name][-1]
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


def _loss(ckpt: Path, data: Path, seq: int, steps: int, layout: str, *extra: str) -> list[str]:
    return ["mode=loss", f"ckpt={ckpt}", "data=local", f"data.dataset_path={data}", f"eval.seq_len={seq}",
            "eval.batch_size=4", f"eval.steps={steps}", "tracking.enabled=false", f"parallel={layout}", *extra]


def _driver_jobs(tmp: Path, hf: Path, dcp: Path) -> dict[str, dict]:
    shards, val = tmp / "shards", tmp / "val"
    jobs = {}
    for steps in (-1, 8):
        tag = "all" if steps == -1 else steps
        jobs[f"hf_fsdp_{tag}"] = {"args": _loss(hf, shards, SEQ, steps, "fsdp")}
        jobs[f"hf_tp_{tag}"] = {"args": _loss(hf, shards, SEQ, steps, "tp")}
        jobs[f"hf_pp_{tag}"] = {"args": _loss(hf, shards, SEQ, steps, "pp", "parallel.microbatches=2",
                                              f"parallel.pp_schedule={'GPipe' if steps == -1 else '1F1B'}")}
    for layout in ("fsdp", "tp", "pp", "none"):
        jobs[f"dcp_{layout}_all"] = {"args": _loss(dcp, val, 16, -1, layout, "parallel.microbatches=2")}
    jobs["dcp_fsdp_5"] = {"args": _loss(dcp, val, 16, 5, "fsdp")}
    # data=hf: rank 0 tokenizes, every rank gets the same windows (broadcast), each evaluates its share
    jobs["hfdata_fsdp_all"] = {"args": [a for a in _loss(hf, val, SEQ, -1, "fsdp") if not a.startswith("data")]
                               + ["data=hf", f"data.name={tmp / 'ds'}"]}
    jobs["resume"] = {"args": _train_args(tmp, "parallel=fsdp", "train.batch_size=2", "eval.batch_size=2",
                                          f"checkpoint.dir={tmp / 'ck_resume'}", "checkpoint.resume=true",
                                          "tracking.run_name=fsdp_resumed")}
    jobs["tp_train"] = {"args": _train_args(tmp, "parallel=tp", "train.batch_size=4", "eval.batch_size=4",
                                            f"checkpoint.dir={tmp / 'ck_tp'}", "tracking.run_name=tp")}
    jobs["pp_train"] = {"args": _train_args(tmp, "parallel=pp", "parallel.microbatches=2", "train.batch_size=4",
                                            "eval.batch_size=4", f"checkpoint.dir={tmp / 'ck_pp'}",
                                            "tracking.run_name=pp")}
    jobs["fail_rank1"] = {"args": _loss(hf, shards, SEQ, 2, "fsdp"), "fail_rank": 1}
    jobs["bad_microbatches"] = {"args": _loss(hf, shards, SEQ, 2, "pp", "parallel.microbatches=3")}
    return jobs


def _driver(spec_path: str) -> None:
    """Run under torchrun: every job through app.main in this process; results per rank to JSON."""
    from ckpteval import app

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    out: dict[str, dict] = {}
    # One process group for all jobs (re-creating it in one torchrun launch races on the launcher's store).
    shutdown, app.shutdown = app.shutdown, lambda: None
    for name, job in spec["jobs"].items():
        print(f"[driver rank {rank}] job {name}", file=sys.stderr, flush=True)
        cfg = factories.compose(job["args"])
        err = io.StringIO()
        with contextlib.ExitStack() as stack:
            if job.get("fail_rank") == rank:
                import ckpteval.checkpoint as ckpt_pkg

                def broken(*_a, **_k):
                    raise OSError("injected read error")

                original = ckpt_pkg.load_model
                ckpt_pkg.load_model = broken
                stack.callback(setattr, ckpt_pkg, "load_model", original)
            try:
                with contextlib.redirect_stderr(err):
                    out[name] = {"result": factories.without_timings(app.main(cfg))}
            except SystemExit as exc:
                out[name] = {"exit": exc.code, "stderr": err.getvalue()}
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(out, default=str))
    shutdown()


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_tokenizer_dir):
    """Both torchrun launches, once for the module: the CLI FSDP training run, then the driver."""
    tmp = tmp_path_factory.mktemp("parallel")
    shutil.copytree(tiny_tokenizer_dir, tmp / "tok")
    hf = factories.make_hf_checkpoint(tmp / "hf" / "step_120", tiny_tokenizer_dir, layers=3)
    factories.make_token_shards(tmp / "shards")
    factories.make_token_shards(tmp / "train", lengths=(3000,), seed=1)
    factories.make_token_shards(tmp / "val", lengths=(230,), seed=2)  # 14 windows of 16
    _hf_dataset(tmp / "ds")

    # default run dir and checkpoint dir: every rank must agree on them (rank 0's, whatever second each started)
    cli = factories.run_cli(_train_args(tmp, "parallel=fsdp", "train.batch_size=2", "eval.batch_size=2",
                                        "tracking.run_name=fsdp", f"paths.outputs={tmp / 'out'}"),
                            cwd=tmp, timeout=240, launcher=_torchrun())
    assert cli.returncode == 0, cli.stderr[-4000:]
    run_dirs = list((tmp / "out" / "train_eval").iterdir())
    assert len(run_dirs) == 1, run_dirs  # no second run dir from rank 1
    run_dirs[0].rename(tmp / "cli_run")
    shutil.move(tmp / "cli_run" / "checkpoints", tmp / "ck_fsdp")
    # 2-D training: tp=2 inside each of dp=2 FSDP replicas (4 processes)
    tp2d = factories.run_cli(_train_args(tmp, "parallel=tp", "parallel.tp=2", "train.batch_size=2",
                                         "eval.batch_size=2", f"checkpoint.dir={tmp / 'ck_tp2d'}",
                                         "tracking.run_name=tp2d", f"hydra.run.dir={tmp / 'tp2d_run'}"),
                             cwd=tmp, timeout=300, launcher=_torchrun(4))
    assert tp2d.returncode == 0, tp2d.stderr[-4000:]
    # pp=2 x dp=2: two pipelines, each stage FSDP-sharded over its data-parallel pair (4 processes)
    pp2d = factories.run_cli(_train_args(tmp, "parallel=pp", "parallel.pp=2", "parallel.microbatches=2",
                                         "train.batch_size=2", "eval.batch_size=2", f"checkpoint.dir={tmp / 'ck_pp2d'}",
                                         "tracking.run_name=pp2d", f"hydra.run.dir={tmp / 'pp2d_run'}"),
                             cwd=tmp, timeout=300, launcher=_torchrun(4))
    assert pp2d.returncode == 0, pp2d.stderr[-4000:]
    shutil.copytree(tmp / "ck_fsdp", tmp / "ck_resume")
    shutil.rmtree(tmp / "ck_resume" / "step_6")  # as if the job died after step_3

    spec = {"jobs": _driver_jobs(tmp, hf, tmp / "ck_fsdp" / "step_6"), "out": str(tmp)}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(factories.REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(_torchrun() + ["-m", "tests.test_parallel", str(tmp / "spec.json")], cwd=tmp, env=env,
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return SimpleNamespace(tmp=tmp, hf=hf, dcp=tmp / "ck_fsdp" / "step_6", cli=cli, ranks=ranks)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp", "tp", "pp"])
@pytest.mark.parametrize("steps", [-1, 8])
def test_hf_checkpoint_loss_matches_reference(launched, layout, steps, monkeypatch):
    from ckpteval import app

    monkeypatch.chdir(launched.tmp)
    result = launched.ranks[0][f"hf_{layout}_{'all' if steps == -1 else steps}"]["result"]
    assert launched.ranks[1][f"hf_{layout}_{'all' if steps == -1 else steps}"]["result"] == result
    arrays = _shards(launched.tmp / "shards")
    n = sum((len(a) - 1) // SEQ for a in arrays)
    assert n % 8 != 0 and n % 4 != 0  # one pass needs padding rows for dp=2 and dp=1
    dp = 2 if layout == "fsdp" else 1
    ids = _window_ids(n, 4, steps, dp)
    ref = factories.reference_loss(_hf_model(launched.hf), arrays, SEQ, window_ids=ids)
    assert result["eval/tokens"] == (n if ids is None else len(ids)) * SEQ
    assert abs(result["eval/loss"] - ref) < TOL
    # parallel=none on the same windows (one process: dp x more steps)
    none_steps = -1 if steps == -1 else steps * dp
    none = app.main(factories.compose(_loss(launched.hf, launched.tmp / "shards", SEQ, none_steps, "none")))
    assert none["eval/tokens"] == result["eval/tokens"]
    assert abs(result["eval/loss"] - none["eval/loss"]) < TOL


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp", "tp", "pp", "none"])
def test_dcp_from_fsdp_training_loads_in_every_layout(launched, layout, monkeypatch):
    from ckpteval import app

    monkeypatch.chdir(launched.tmp)
    result = launched.ranks[0][f"dcp_{layout}_all"]["result"]
    arrays = _shards(launched.tmp / "val")
    ref = factories.reference_loss(_dcp_model(launched.dcp), arrays, 16)
    assert result["step"] == 6 and result["tokens_seen"] == 6 * 2 * 2 * 16
    assert result["eval/tokens"] == 14 * 16
    assert abs(result["eval/loss"] - ref) < TOL
    none = app.main(factories.compose(_loss(launched.dcp, launched.tmp / "val", 16, -1, "none")))
    assert abs(result["eval/loss"] - none["eval/loss"]) < TOL
    if layout == "fsdp":  # fixed steps that wrap around: 5 x 4 x dp 2 = 40 windows of 14
        fixed = launched.ranks[0]["dcp_fsdp_5"]["result"]
        ref5 = factories.reference_loss(_dcp_model(launched.dcp), arrays, 16, window_ids=_window_ids(14, 4, 5, 2))
        assert fixed["eval/tokens"] == 40 * 16 and abs(fixed["eval/loss"] - ref5) < TOL


@pytest.fixture(scope="module")
def single_process_training(launched):
    """The same training in one process, batch 4: what 2 FSDP ranks x batch 2 and tp=2 x batch 4 both see."""
    from ckpteval import app

    tmp = launched.tmp
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        app.main(factories.compose(_train_args(tmp, "train.batch_size=4", "eval.batch_size=4",
                                               f"checkpoint.dir={tmp / 'ck_none'}", "tracking.run_name=none")))
    return tmp


def _assert_same_training(tmp: Path, run_name: str) -> None:
    for key in ("train/loss", "eval/loss"):
        none, other = _history(tmp, "none", key), _history(tmp, run_name, key)
        assert sorted(other) == sorted(none) and len(none) >= 2
        for step in none:
            assert other[step] == pytest.approx(none[step], abs=2e-5), (run_name, key, step)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp", "pp", "tp2d", "pp2d"])
def test_model_parallel_training_matches_single_process(launched, single_process_training, layout, monkeypatch):
    """tp=2 (DTensor shards + replicated embeddings/norms/head), pp=2 (2 stages x 2 microbatches) and tp=2 x
    dp=2 (FSDP over TP shards, 4 processes) and pp=2 x dp=2 (FSDP inside each stage) train with the same losses as
    one process; the DCP checkpoint the
    ranks save together loads unsharded, mode=loss giving the in-loop eval/loss."""
    from ckpteval import app

    tmp = launched.tmp
    _assert_same_training(tmp, layout)
    monkeypatch.chdir(tmp)
    result = app.main(factories.compose(_loss(tmp / f"ck_{layout}" / "step_6", tmp / "val", 16, 3, "none")))
    assert result["eval/loss"] == pytest.approx(_history(tmp, layout, "eval/loss")[6], abs=1e-5)


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp_training_matches_single_process(launched, single_process_training):
    tmp = launched.tmp
    _assert_same_training(tmp, "fsdp")
    # the CLI contract under torchrun: one result line, results.json in the (shared) run dir
    cli_result = factories.last_json_line(launched.cli.stdout)
    assert cli_result["step"] == 6
    assert json.loads((tmp / "cli_run" / "results.json").read_text()) == cli_result
    assert launched.cli.stdout.count('"eval/loss"') == 1  # only rank 0 printed the result
    assert sorted(p.name for p in (tmp / "ck_fsdp").iterdir()) == ["step_3", "step_6"]
    # resume under FSDP from step_3 reproduces steps 4-6 of the uninterrupted run
    resumed = _history(tmp, "fsdp_resumed", "train/loss")
    full = _history(tmp, "fsdp", "train/loss")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6)
    assert launched.ranks[0]["resume"]["result"]["eval/loss"] == pytest.approx(cli_result["eval/loss"], abs=1e-6)


def _hf_dataset(path: Path) -> list[str]:
    from datasets import Dataset, DatasetDict

    docs = [f"Document {i}: " + " ".join(factories.TEXT[(i + k) % len(factories.TEXT)] for k in range(4))
            for i in range(15)]
    DatasetDict({"validation": Dataset.from_dict({"text": docs})}).save_to_disk(path)
    return docs


@pytest.mark.dist
@pytest.mark.slow
def test_hf_dataset_under_fsdp_matches_reference(launched):
    """data=hf under torchrun: rank 0 tokenizes and broadcasts; one pass over the windows split over 2 ranks."""
    from transformers import AutoTokenizer

    result = launched.ranks[0]["hfdata_fsdp_all"]["result"]
    assert launched.ranks[1]["hfdata_fsdp_all"]["result"] == result
    tok = AutoTokenizer.from_pretrained(launched.hf)
    docs = _hf_dataset(launched.tmp / "ds_check")
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    ref = factories.reference_loss(_hf_model(launched.hf), [np.array(stream)], SEQ)
    assert result["eval/tokens"] == ((len(stream) - 1) // SEQ) * SEQ
    assert abs(result["eval/loss"] - ref) < TOL


@pytest.mark.dist
@pytest.mark.slow
def test_ranks_fail_together_and_rank0_prints_one_message(launched):
    for name, expected in (("fail_rank1", "OSError: injected read error"),
                           ("bad_microbatches", "eval.batch_size=4 is not divisible by parallel.microbatches=3")):
        outcomes = [r[name] for r in launched.ranks]
        assert [o.get("exit") for o in outcomes] == [2, 2], outcomes
        last = outcomes[0]["stderr"].strip().splitlines()[-1]
        assert last.startswith("error: ") and expected in last, outcomes[0]["stderr"]
        # the same error on every rank is printed once, by rank 0
        assert not [ln for ln in outcomes[1]["stderr"].splitlines() if ln.startswith("error")], outcomes[1]


if __name__ == "__main__":
    _driver(sys.argv[1])

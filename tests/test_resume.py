"""Preemption-proof evaluations (issue 24): a killed harness or loss job resumes from the result store, computes
only what is missing, and ends with the uninterrupted job's numbers, bit for bit.

Slow tier, real processes and real signals (tests/resume_child.py sends the signal to the job's process group once
the job has recorded a chosen share of its work): SIGKILL / SIGTERM at ~60% of a harness job's loglikelihood or
generation requests and of a loss job's windows, then the same command again; a 2-rank torchrun harness job killed
and resumed at 1 rank, and the reverse. The reference is an uninterrupted run of the same command in the same kind
of process (OMP_NUM_THREADS=1). What the resumed job computed is counted from the store: its own file holds
exactly the keys the killed job did not save.

Fast tier, in process: the store's format (damaged and cut lines, live writers, eviction), FastLM resumed batch by
batch, a checkpoint rewritten in place (same size and time), a truncated store file, a read-only store (one
error before the model loads), and a FINISHED job's entries dropped unless cache.keep=true.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ckpteval import app
from ckpteval.evaluation import result_store
from ckpteval.tasks import TASKS_DIR
from tests import factories

TASKS = ["ckpteval_mc", "ckpteval_rolling", "ckpteval_gen"]
SEQ = 32
CHILD = factories.REPO / "tests" / "resume_child.py"
RESUMED = re.compile(r"(\w+(?: on \w+)?): resumed (\d+) of (\d+) (requests|windows) \(([\d.]+) s of work saved\)")


# ---------------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={_free_port()}"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def _keys_by_file(store: Path) -> dict[Path, list[str]]:
    """Every key in the store's writer files, read here line by line (`<crc32> <json>`; cut lines skipped)."""
    out = {}
    for f in sorted(store.glob("*/*.jsonl")):
        keys = []
        for line in f.read_bytes().split(b"\n"):
            try:
                keys += [k for k, _ in json.loads(line[9:])["r"]]
            except (ValueError, KeyError):
                continue
        out[f] = keys
    return out


def _kind(key: str) -> str:
    return key.split(":", 1)[0]


def _resumed(text: str) -> dict[str, tuple[int, int]]:
    return {m.group(1): (int(m.group(2)), int(m.group(3))) for m in RESUMED.finditer(text)}


def _kill(args: list[str], cwd: Path, sig: str, kind: str, count: int, ranks: int = 1) -> str:
    """Run a job that `resume_child` stops with `sig` once it recorded `count` results of `kind` (per rank)."""
    child = [str(CHILD), sig, kind, str(-(-count // ranks)), "--", *args]
    cmd = (_torchrun(ranks) if ranks > 1 else [sys.executable]) + child
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600,
                          start_new_session=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"sending {sig}" in text, text[-4000:]
    assert "Traceback" not in text or sig == "SIGKILL", text[-4000:]
    return text


def _run(args: list[str], cwd: Path, ranks: int = 1) -> tuple[dict, str]:
    proc = factories.run_cli(args, cwd, timeout=600, launcher=_torchrun(ranks) if ranks > 1 else None)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    return factories.last_json_line(proc.stdout), text


def _metrics(line: dict) -> dict:
    """The numbers that measure the checkpoint: timings (runtime, overhead, time/startup_seconds) left out."""
    return factories.without_timings(line)


def _samples(run_dir: Path) -> dict[str, list]:
    """Per task, each document's responses as lm-eval logged them (loglikelihoods, greedy texts)."""
    out = {}
    for f in sorted(run_dir.glob("lm_eval/*/*/samples_*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[f.name] = [(r["doc_id"], r["resps"], r["filtered_resps"]) for r in rows]
    return out


def _count_resume(store: Path, before: dict[Path, list[str]], reference: dict[str, set]) -> dict[str, int]:
    """What the resumed job computed (its own files) is exactly what the killed job had not saved; every
    reference key is there once. Returns the killed job's saved count per kind."""
    after = _keys_by_file(store)
    old = {k for f, keys in before.items() for k in keys}
    new = [k for f, keys in after.items() if f not in before for k in keys]
    assert len(new) == len(set(new)), "the resumed job computed a result twice"
    assert old.isdisjoint(new), "the resumed job computed results the store already held"
    everything = collections.defaultdict(set)
    for k in old | set(new):
        everything[_kind(k)].add(k)
    assert everything == reference
    return collections.Counter(_kind(k) for k in old)


# ---------------------------------------------------------------------------------------------- harness (slow)


def _harness_args(ckpt: Path, store: Path, run_dir: Path, flush_s: float = 0) -> list[str]:
    return ["mode=harness", f"ckpt={ckpt}", "harness=offline", f"harness.include_path={TASKS_DIR}",
            f"harness.tasks=[{','.join(TASKS)}]", "harness.batch_size=2", "tracking.enabled=false",
            f"cache.dir={store}", "cache.keep=true", f"cache.flush_s={flush_s}", f"hydra.run.dir={run_dir}"]


@pytest.fixture(scope="module")
def harness_ref(tmp_path_factory, tiny_hf_ckpt):
    """The uninterrupted job: metrics, per-document responses, and every key it stored (by kind)."""
    tmp = tmp_path_factory.mktemp("harness_ref")
    line, _ = _run(_harness_args(tiny_hf_ckpt, tmp / "store", tmp / "run"), tmp)
    keys = collections.defaultdict(set)
    for k in (k for ks in _keys_by_file(tmp / "store").values() for k in ks):
        keys[_kind(k)].add(k)
    # gold: the generative task's gold answers (bpb), scored in the generation prefills and stored with them
    assert set(keys) == {"ll", "roll", "gen", "gold"} and len(keys["gen"]) == len(keys["gold"]) == 40
    return {"metrics": _metrics(line), "samples": _samples(tmp / "run"), "keys": dict(keys), "ckpt": tiny_hf_ckpt}


def _resume_and_check(ref: dict, tmp: Path, store: Path, ranks: int = 1) -> tuple[str, dict[str, int]]:
    before = _keys_by_file(store)
    line, text = _run(_harness_args(ref["ckpt"], store, tmp / "resumed"), tmp, ranks=ranks)
    assert _metrics(line) == ref["metrics"]  # identical numbers, not close ones
    assert _samples(tmp / "resumed") == ref["samples"]  # every loglikelihood bit, every generated text
    saved = _count_resume(store, before, ref["keys"])
    return text, saved


@pytest.fixture(scope="module")
def killed_in_generation(tmp_path_factory, harness_ref):
    """A 1-rank job SIGKILLed once it recorded 60% of its generations (results are recorded per segment of 8
    batches = 16 prompts here, so the kill comes after 32 of 40): the store it left."""
    tmp = tmp_path_factory.mktemp("killed_gen")
    _kill(_harness_args(harness_ref["ckpt"], tmp / "store", tmp / "run"), tmp, "SIGKILL", "gen", 24)
    return tmp / "store"


@pytest.mark.slow
def test_sigkill_in_generation_then_the_same_command(tmp_path, harness_ref, killed_in_generation):
    store = tmp_path / "store"
    shutil.copytree(killed_in_generation, store)
    text, saved = _resume_and_check(harness_ref, tmp_path, store)
    lines = _resumed(text)
    assert saved["gen"] == 32 and lines["generate_until"] == (32, 40), text[-3000:]
    # lm-eval's own loglikelihood requests run before generation: the killed job had saved them all, and the
    # resumed job read every one back; the gold answers of the generation task (harness/*/bpb) are scored in the
    # generation prefills and stored with each segment: the killed job's 32 were read back with their texts, the
    # resumed job scored the other 8 with theirs (_count_resume: each exactly once), no loglikelihood request
    assert lines["loglikelihood"][0] == lines["loglikelihood"][1] > 0
    assert saved["ll"] == len(harness_ref["keys"]["ll"]) and saved["gold"] == 32
    assert lines["loglikelihood_rolling"][0] == lines["loglikelihood_rolling"][1] > 0


@pytest.mark.slow
@pytest.mark.dist
def test_killed_at_1_rank_resumes_at_2_ranks(tmp_path, harness_ref, killed_in_generation):
    store = tmp_path / "store"
    shutil.copytree(killed_in_generation, store)
    text, saved = _resume_and_check(harness_ref, tmp_path, store, ranks=2)
    assert _resumed(text)["generate_until"] == (32, 40) and saved["gen"] == 32


@pytest.mark.slow
def test_sigterm_in_loglikelihood_then_the_same_command(tmp_path, harness_ref):
    """SIGTERM with nothing written by the timer (cache.flush_s=3600): what the job had computed reaches the disk
    on its way out (the job ends KILLED), and the next start reads it."""
    n_ll = len(harness_ref["keys"]["ll"])
    store = tmp_path / "store"
    text = _kill(_harness_args(harness_ref["ckpt"], store, tmp_path / "run", flush_s=3600), tmp_path,
                 "SIGTERM", "ll", int(0.6 * n_ll))
    assert "stopped by SIGTERM" in text
    text, saved = _resume_and_check(harness_ref, tmp_path, store)
    assert int(0.6 * n_ll) <= saved["ll"] < n_ll and saved.get("gen", 0) == 0
    done, total = _resumed(text)["loglikelihood"]
    assert 0 < done < total


@pytest.mark.slow
@pytest.mark.dist
def test_killed_at_2_ranks_resumes_at_1_rank(tmp_path, harness_ref):
    n_ll = len(harness_ref["keys"]["ll"])
    store = tmp_path / "store"
    _kill(_harness_args(harness_ref["ckpt"], store, tmp_path / "run"), tmp_path, "SIGKILL", "ll", int(0.6 * n_ll),
          ranks=2)
    writers = list(store.glob("*/*.jsonl"))
    assert len(writers) == 2  # both ranks recorded their own batches
    text, saved = _resume_and_check(harness_ref, tmp_path, store)
    assert 0 < saved["ll"] < n_ll
    assert 0 < _resumed(text)["loglikelihood"][0] < _resumed(text)["loglikelihood"][1]


# ---------------------------------------------------------------------------------------------- loss (slow)


def _loss_args(ckpt: Path, shards: Path, store: Path, run_dir: Path, flush_s: float = 0) -> list[str]:
    return ["mode=loss", f"ckpt={ckpt}", "data=local", f"data.dataset_path={shards}", f"eval.seq_len={SEQ}",
            "eval.batch_size=4", "eval.steps=-1", "tracking.enabled=false", f"cache.dir={store}", "cache.keep=true",
            f"cache.flush_s={flush_s}", f"hydra.run.dir={run_dir}"]


@pytest.fixture(scope="module")
def loss_ref(tmp_path_factory, tiny_hf_ckpt, tiny_token_shards):
    tmp = tmp_path_factory.mktemp("loss_ref")
    line, _ = _run(_loss_args(tiny_hf_ckpt, tiny_token_shards, tmp / "store", tmp / "run"), tmp)
    keys = {k for ks in _keys_by_file(tmp / "store").values() for k in ks}
    assert len(keys) == line["eval/tokens"] // SEQ == 55
    windows = (tmp / "run" / "window_nll.npz").read_bytes()
    return {"line": line, "keys": {"w": keys}, "windows": windows}


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_loss_killed_at_60pct_then_the_same_command(tmp_path, loss_ref, tiny_hf_ckpt, tiny_token_shards, sig):
    store = tmp_path / "store"
    args = _loss_args(tiny_hf_ckpt, tiny_token_shards, store, tmp_path / "run")
    flush_s = 3600 if sig == "SIGTERM" else 0  # SIGTERM: what was computed reaches the disk on the way out
    _kill(_loss_args(tiny_hf_ckpt, tiny_token_shards, store, tmp_path / "run", flush_s), tmp_path, sig, "w", 33)
    assert not (tmp_path / "run" / "results.json").exists()
    before = _keys_by_file(store)
    line, text = _run(args, tmp_path)
    assert _metrics(line) == _metrics(loss_ref["line"])  # loss, perplexity, bpb, stderr, tokens: the same bits
    assert (tmp_path / "run" / "window_nll.npz").read_bytes() == loss_ref["windows"]
    saved = _count_resume(store, before, loss_ref["keys"])
    assert 36 <= saved["w"] < 55  # blocks of 4 windows: the kill came after the 9th
    assert _resumed(text)["loss on data"] == (saved["w"], 55)


# ---------------------------------------------------------------------------------------------- fast tier


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _loss_cfg(tmp: Path, ckpt: Path, shards: Path, *extra: str):
    return factories.compose(["mode=loss", f"ckpt={ckpt}", "data=local", f"data.dataset_path={shards}",
                              f"eval.seq_len={SEQ}", "eval.batch_size=4", "eval.steps=-1", "tracking.enabled=false",
                              f"cache.dir={tmp / 'store'}", "cache.flush_s=0", *extra])


def _store(tmp: Path, max_gb: float = 20.0, flush_s: float = 0.0) -> result_store.ResultStore:
    cfg = factories.compose([f"cache.dir={tmp}", f"cache.max_gb={max_gb}", f"cache.flush_s={flush_s}"]).cache
    return result_store.open_store(cfg)


def test_entry_round_trip_damaged_lines_and_live_writers(tmp_path, caplog):
    store = _store(tmp_path / "s", flush_s=3600)
    entry = store.entry({"path": "/x", "content": "1"}, {"kind": "t"})
    entry.add([("a", [1.0, True]), ("b", "text")], 2.0)
    assert not list(entry.dir.glob("*.jsonl"))  # buffered: flush_s not reached
    entry.add([("c", 0.1 + 0.2)], 3598.0)  # the unwritten work reaches flush_s: written now
    reader = store.entry({"path": "/x", "content": "1"}, {"kind": "t"})
    found = reader.lookup()
    assert found == {"a": ([1.0, True], 1.0), "b": ("text", 1.0), "c": (0.1 + 0.2, 3598.0)}  # floats exact
    [path] = entry.dir.glob("*.jsonl")
    with open(path, "ab") as f:  # the writer is live (its lock is held): a line cut short is a write under way
        f.write(b"0000abcd {\"r\": [[\"d\"")
    with caplog.at_level(logging.WARNING, "ckpteval"):
        assert reader.lookup() == found and not caplog.records
    entry.close()  # the writer is gone: the cut line is damage now, and so is a line whose checksum fails
    good = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([good[0], good[1].replace(b'"c"', b'"e"'), good[2]]))
    with caplog.at_level(logging.WARNING, "ckpteval"):
        assert reader.lookup() == {"a": ([1.0, True], 1.0), "b": ("text", 1.0)}  # c's line is damaged
    [warning] = caplog.records
    assert "2 damaged record(s) in 1 file(s)" in warning.getMessage()
    assert path.read_bytes() == good[0] + b"\n"  # rewritten without them
    caplog.clear()
    with caplog.at_level(logging.WARNING, "ckpteval"):
        reader.lookup()
    assert not caplog.records


def test_eviction_keeps_live_and_recent_entries(tmp_path):
    store = _store(tmp_path / "s")
    entries = []
    for i in range(3):
        e = store.entry({"path": f"/ckpt{i}", "content": "1"}, {"kind": "t"})
        e.add([(f"k{j}", "x" * 1000) for j in range(100)], 1.0)  # ~100 KB each
        e.flush()
        os.utime(e.dir / result_store.META, (1000 + i, 1000 + i))
        for f in e.dir.glob("*.jsonl"):
            os.utime(f, (1000 + i, 1000 + i))
        entries.append(e)
    entries[1].close()
    entries[2].close()  # entry 0's writer is still live: never evicted
    store.max_bytes = 250_000  # 3 x ~100 KB: one entry has to go
    store.evict()
    assert [e.dir.exists() for e in entries] == [True, False, True]  # the oldest free one went
    store.max_bytes = 10_000
    again = store.entry({"path": "/ckpt2", "content": "1"}, {"kind": "t"})  # a job resumes the oldest free entry:
    assert again.dir == entries[2].dir and [e.dir.exists() for e in entries] == [True, False, True]  # kept
    store.entry({"path": "/ckpt3", "content": "1"}, {"kind": "t"})  # another job's entry: entry 2 has to go now
    assert [e.dir.exists() for e in entries] == [True, False, False]


def test_fastlm_resumed_batch_by_batch_gives_identical_results(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """FastLM with a store: a second FastLM on a store holding part of the batches runs only the others (counted
    here), and every loglikelihood, generated text and gold score scored in a generation prefill (bpb) is the
    first one's, bit for bit, at batch size 2 (and the same as with no store at all: scores to float rounding)."""
    from transformers import AutoTokenizer

    from ckpteval.evaluation import generate
    from ckpteval.evaluation.fast_lm import FastLM
    from tests.test_fast_lm import _gen, _instances, _preamble_prompts, _requests

    model = factories.make_model()
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    reqs = _instances(_requests(model, tok))
    rolling = _instances([(" ".join(factories.TEXT[:k]),) for k in (3, 30)], "loglikelihood_rolling")
    gens = _gen(factories.TEXT[:6] * 2 + _preamble_prompts()[:6], {"until": ["\n", "e"], "max_gen_toks": 3})
    store = _store(tmp_path / "s")
    gold_of = {p: [" yes", " the lazy dog", "no"][k % 3] for k, p in enumerate(dict.fromkeys(r.args[0] for r in gens))}
    calls = collections.Counter()
    greedy = generate.greedy_generate
    monkeypatch.setattr(generate, "greedy_generate", lambda *a, **k: calls.update(["segment"]) or greedy(*a, **k))

    def run(entry):
        lm = FastLM(model, tok, batch_size=2)
        lm.results = entry
        lm.gold_target = lambda req: gold_of[req.args[0]]
        score = lm._score_batch
        lm._score_batch = lambda *a: calls.update(["batch"]) or score(*a)
        calls.clear()
        out = (lm.loglikelihood(reqs), lm.loglikelihood_rolling(rolling), lm.generate_until(gens),
               lm.take_gold_scores())
        entry.close()
        return out, dict(calls)

    first = store.entry({"path": "/m", "content": "1"}, {"kind": "t"})
    want, counted = run(first)
    plain = FastLM(model, tok, batch_size=2)
    plain.gold_target = lambda req: gold_of[req.args[0]]
    assert want[:3] == (plain.loglikelihood(reqs), plain.loglikelihood_rolling(rolling), plain.generate_until(gens))
    plain_gold = plain.take_gold_scores()
    assert len(want[3]) >= 8 and set(want[3]) == set(plain_gold)
    assert all(want[3][k][0] == pytest.approx(plain_gold[k][0], abs=1e-4) for k in plain_gold)
    [path] = first.dir.glob("*.jsonl")
    lines = path.read_bytes().split(b"\n")[:-1]
    by_kind = {k: [ln for ln in lines if f'"{k}:'.encode() in ln] for k in ("ll", "roll", "gen")}
    assert [len(by_kind[k]) for k in ("roll", "gen")] == [2, 2] and len(by_kind["ll"]) > 4  # batches, segments
    assert all(b'"gold:' in ln for ln in by_kind["gen"])  # a segment's gold scores are recorded with its texts
    kept = by_kind["ll"][::2] + by_kind["roll"][:1] + by_kind["gen"][1:2]  # a kill leaves any subset of batches
    path.write_bytes(b"".join(ln + b"\n" for ln in kept))
    again, counted2 = run(store.entry({"path": "/m", "content": "1"}, {"kind": "t"}))
    assert again == want
    assert counted == {"batch": len(by_kind["ll"]) + 2, "segment": 2}
    assert counted2 == {"batch": len(by_kind["ll"]) - len(by_kind["ll"][::2]) + 1, "segment": 1}


def _rewrite_in_place(ckpt: Path, seed: int) -> None:
    """Other weights of the same architecture at the same path: same file size, same modification time."""
    st = (ckpt / "model.safetensors").stat()
    other = factories.make_hf_checkpoint(ckpt.parent / "other", seed=seed)
    shutil.copyfile(other / "model.safetensors", ckpt / "model.safetensors")
    assert (ckpt / "model.safetensors").stat().st_size == st.st_size
    os.utime(ckpt / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.rmtree(other)


def test_checkpoint_rewritten_in_place_reuses_nothing(in_tmp, tiny_tokenizer_dir, tiny_token_shards, caplog):
    ckpt = factories.make_hf_checkpoint(in_tmp / "run" / "step_10", tiny_tokenizer_dir, seed=1)
    first = app.main(_loss_cfg(in_tmp, ckpt, tiny_token_shards, "cache.keep=true"))  # as if killed: entry kept
    [old_entry] = (in_tmp / "store").iterdir()
    _rewrite_in_place(ckpt, seed=2)
    with caplog.at_level(logging.INFO, "ckpteval"):
        second = app.main(_loss_cfg(in_tmp, ckpt, tiny_token_shards, "cache.keep=true"))
    assert "resumed" not in caplog.text
    assert not old_entry.exists() and "earlier content" in caplog.text  # the old results are deleted
    fresh = app.main(_loss_cfg(in_tmp, ckpt, tiny_token_shards, "cache.enabled=false"))
    assert _metrics(second) == _metrics(fresh) and second["eval/loss"] != first["eval/loss"]


def test_truncated_store_file_warns_and_recomputes(in_tmp, tiny_hf_ckpt, tiny_token_shards, caplog):
    ref = app.main(_loss_cfg(in_tmp, tiny_hf_ckpt, tiny_token_shards, "cache.keep=true"))
    [path] = (in_tmp / "store").glob("*/*.jsonl")
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * 0.6)])  # killed mid-write / disk full: cut inside a line
    kept_lines = data[:int(len(data) * 0.6)].count(b"\n")
    with caplog.at_level(logging.INFO, "ckpteval"):
        again = app.main(_loss_cfg(in_tmp, tiny_hf_ckpt, tiny_token_shards))
    assert _metrics(again) == _metrics(ref)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("ckpteval")]
    assert len(warnings) == 1 and "1 damaged record(s)" in warnings[0].getMessage()
    assert _resumed(caplog.text)["loss on data"] == (4 * kept_lines, 55)  # blocks of 4 windows
    assert not list((in_tmp / "store").iterdir())  # FINISHED: the entry is dropped (cache.keep=false)


@pytest.mark.parametrize("mode", ["loss", "harness"])
def test_read_only_store_is_one_error_before_the_model_loads(in_tmp, tiny_hf_ckpt, tiny_token_shards, mode,
                                                             monkeypatch, capsys):
    if os.geteuid() == 0:  # root writes through permission bits: sysfs refuses everyone
        place = Path("/sys/ckpteval-result-store")
    else:
        place = in_tmp / "ro"
        place.mkdir()
        place.chmod(0o555)
    loaded = []
    monkeypatch.setattr("ckpteval.modes.loss.load_eval_model", lambda *a: loaded.append(a))
    monkeypatch.setattr("ckpteval.modes.harness.load_model", lambda *a, **k: loaded.append(a))
    extra = ["mode=harness", "harness=offline", f"harness.include_path={TASKS_DIR}"] if mode == "harness" else []
    with pytest.raises(SystemExit) as exc:
        app.main(_loss_cfg(in_tmp, tiny_hf_ckpt, tiny_token_shards, f"cache.dir={place}", *extra))
    assert exc.value.code == 2 and not loaded
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert line.startswith(f"error: cache.dir={place} is not writable (") and "cache.enabled=false" in line
    assert "Traceback" not in err


def test_finished_job_drops_its_entries_unless_keep(in_tmp, tiny_hf_ckpt, tiny_token_shards):
    app.main(_loss_cfg(in_tmp, tiny_hf_ckpt, tiny_token_shards, "cache.keep=true"))
    assert len(list((in_tmp / "store").iterdir())) == 1
    app.main(_loss_cfg(in_tmp, tiny_hf_ckpt, tiny_token_shards))
    assert not list((in_tmp / "store").iterdir())


def test_cache_config_is_typed():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="cache.keep"):
        factories.compose(["cache.keep=sometimes"])
    with pytest.raises(Exception, match="cache.max_gb=0"):
        result_store.open_store(factories.compose(["cache.max_gb=0"]).cache)
    assert factories.compose(["paths.outputs=/o"]).cache.dir == "/o/result_store"

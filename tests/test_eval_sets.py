"""Several held-out sets per job and bits per byte, against independent references.

Loss: a plain transformers forward over each set's windows. Bytes: the tokenizer's own decoder on the target
tokens of the windows (not our byte table), on a byte-level BPE and on a SentencePiece-style BPE with `▁` and
`<0xNN>` byte-fallback pieces, both built offline here, on text with multi-byte characters.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpteval import app
from tests import factories

SEQ = 32
DOCS = [
    "Café au lait, naïve façade — déjà vu in Zürich.",
    "日本語のテキストも少し。Ελληνικά γράμματα εδώ.",
    "The quick brown fox jumps over the lazy dog 42 times.",
    "Emoji are four bytes: 🙂 and 🚀, accents are two: é ü ñ.",
    "def add(a, b):\n    return a + b  # ≥ ≤ ≠\n",
    "Plain ASCII lines keep the byte-level merges busy and frequent.",
]
MORE = [f"Line {i}: " + DOCS[(i * 5) % len(DOCS)] + " " + DOCS[(i * 7 + 1) % len(DOCS)] for i in range(40)]


def make_sentencepiece_tokenizer(out: Path) -> Path:
    """A Llama-style tokenizer: BPE on `▁`-joined text, `<0xNN>` byte fallback for characters outside its
    alphabet, the decoder transformers uses for such tokenizers; special tokens <unk> <s> </s>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=45,
                                  show_progress=False)
    tok.train_from_iterator(factories.TEXT + MORE[:10], trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte pieces are ordinary (non-special) vocabulary entries, as in Llama 2
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["decoder"] = json.loads(decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)]).__getstate__())
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def _stream(tok, docs: list[str]) -> np.ndarray:
    return np.array([t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])


def _write_bin(path: Path, stream: np.ndarray) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    stream.astype(np.uint16).tofile(path / "shard_000.bin")
    return path


def _decoded_bytes(tok, ids: list[int]) -> int:
    """UTF-8 bytes the tokenizer's decoder gives `ids` (special tokens skipped), after an ASCII anchor token so a
    leading `▁` decodes to the space it stands for. The text must decode cleanly (no partial characters)."""
    pieces = tok.convert_ids_to_tokens(ids)
    k = 0
    while k < len(ids) and re.fullmatch(r"<0x[0-9A-F]{2}>", pieces[len(ids) - 1 - k]):
        k += 1
    if k:  # the targets end inside a character spelled in byte-fallback pieces: each piece is one byte
        return _decoded_bytes(tok, ids[:len(ids) - k]) + k
    anchor = tok("x", add_special_tokens=False)["input_ids"][-1:]
    text = tok.decode(anchor + ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    base = tok.decode(anchor, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert text.startswith(base) and "\ufffd" not in text, "reference needs whole characters at the window ends"
    return len(text.encode("utf-8")) - len(base.encode("utf-8"))


def reference(model, tok, stream: np.ndarray, seq: int) -> dict[str, float]:
    """Loss and bpb over every window of `stream` (eval.steps=-1) from a plain forward and the decoder."""
    n = (len(stream) - 1) // seq
    special = set(tok.all_special_ids)
    nll_all = nll_bytes = 0.0
    with torch.no_grad():
        for k in range(n):
            w = torch.from_numpy(stream[k * seq: k * seq + seq + 1].astype(np.int64))
            logits = model(input_ids=w[None, :-1]).logits[0].double()
            nll = -torch.log_softmax(logits, dim=-1).gather(1, w[1:, None])[:, 0]
            nll_all += float(nll.sum())
            keep = torch.tensor([int(t) not in special for t in w[1:]])
            nll_bytes += float(nll[keep].sum())
    targets = [int(t) for t in stream[1:n * seq + 1]]  # the windows' targets, contiguous with eval.steps=-1
    total_bytes = _decoded_bytes(tok, targets)
    return {"loss": nll_all / (n * seq), "bpb": nll_bytes / (math.log(2) * total_bytes), "tokens": n * seq}


@pytest.fixture(params=["byte_level", "sentencepiece"])
def tokenizer_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "byte_level":
        return factories.make_tokenizer(out)
    return make_sentencepiece_tokenizer(out)


def _setup(tmp: Path, tok_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ckpt = factories.make_hf_checkpoint(tmp / "ckpt" / "step_40", tok_dir, vocab_size=len(tok), max_pos=64)
    streams = {"data": _stream(tok, MORE[:12]), "code": _stream(tok, MORE[12:24]), "web": _stream(tok, MORE[24:])}
    main_dir = _write_bin(tmp / "main", streams["data"])
    code_dir = _write_bin(tmp / "code", streams["code"])
    (tmp / "web").mkdir()
    (tmp / "web" / "validation.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in MORE[24:]))
    overrides = ["mode=loss", f"ckpt={ckpt}", "data=local", f"data.dataset_path={main_dir}",
                 f"eval.seq_len={SEQ}", "eval.batch_size=3", "eval.steps=-1", f"tracking.uri=sqlite:///{tmp}/ml.db",
                 f"+eval.sets.code={{kind: local, dataset_path: '{code_dir}', file_pattern: '*.bin'}}",
                 f"+eval.sets.web={{kind: hf, name: '{tmp / 'web' / 'validation.jsonl'}', split: train, "
                 f"text_field: text}}"]
    return tok, ckpt, streams, overrides


def test_sets_loss_and_bpb_match_independent_references(tmp_path, monkeypatch, tokenizer_dir):
    monkeypatch.chdir(tmp_path)
    tok, ckpt, streams, overrides = _setup(tmp_path, tokenizer_dir)
    if "sentencepiece" in str(tokenizer_dir):  # the test text really exercises byte fallback and `▁`
        pieces = tok.convert_ids_to_tokens(list(streams["code"]))
        assert any(p.startswith("<0x") for p in pieces) and any(p.startswith("▁") for p in pieces)
    result = app.main(factories.compose(overrides))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for name, prefix in (("data", "eval/"), ("code", "eval/code/"), ("web", "eval/web/")):
        ref = reference(model, tok, streams[name], SEQ)
        assert result[f"{prefix}tokens"] == ref["tokens"]
        assert abs(result[f"{prefix}loss"] - ref["loss"]) < 1e-5, name
        assert result[f"{prefix}bpb"] == pytest.approx(ref["bpb"], rel=1e-6), name
        assert result[f"{prefix}perplexity"] == pytest.approx(math.exp(result[f"{prefix}loss"]))
        assert result[f"{prefix}loss_stderr"] > 0
    windows = np.load(tmp_path / "window_nll.npz")
    assert set(windows) == {"data", "code", "web"}
    assert len(windows["code"]) == result["eval/code/tokens"] // SEQ
    assert windows["code"].sum() / result["eval/code/tokens"] == pytest.approx(result["eval/code/loss"], rel=1e-9)


def test_loss_stderr_is_the_standard_error_over_windows(tmp_path, monkeypatch, tiny_tokenizer_dir):
    monkeypatch.chdir(tmp_path)
    tok, ckpt, streams, overrides = _setup(tmp_path, tiny_tokenizer_dir)
    result = app.main(factories.compose(overrides))
    per_window = np.load(tmp_path / "window_nll.npz")["data"] / SEQ
    assert result["eval/loss_stderr"] == pytest.approx(np.std(per_window, ddof=1) / math.sqrt(len(per_window)),
                                                       rel=1e-9)


def test_in_loop_eval_equals_mode_loss_on_every_set(tmp_path, monkeypatch, tiny_tokenizer_dir):
    monkeypatch.chdir(tmp_path)
    tok, _, streams, overrides = _setup(tmp_path, tiny_tokenizer_dir)
    sets = [o for o in overrides if o.startswith("+eval.sets")]
    train = _write_bin(tmp_path / "train", np.tile(streams["data"], 4))
    ckpts = tmp_path / "ckpts"
    common = [f"eval.seq_len={SEQ}", "eval.batch_size=3", "eval.steps=2", f"tracking.uri=sqlite:///{tmp_path}/ml.db",
              "data=local", f"data.dataset_path={tmp_path / 'main'}", *sets]
    model = [f"model.vocab_size={len(tok)}", "model.hidden_size=32", "model.intermediate_size=64",
             "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.num_key_value_heads=1",
             "model.max_position_embeddings=64"]
    trained = app.main(factories.compose(["mode=train_eval", f"data.train_path={train}", f"tokenizer={tiny_tokenizer_dir}",
                                          *model, *common, "train.steps=4", "train.batch_size=2", "train.seq_len=16",
                                          "train.warmup_steps=1", "eval.interval=4", "checkpoint.interval=4",
                                          f"checkpoint.dir={ckpts}"]))
    standalone = app.main(factories.compose(["mode=loss", f"ckpt={ckpts / 'step_4'}", *common]))
    keys = [k for k in trained if k.startswith("eval/")]
    assert {"eval/bpb", "eval/code/loss", "eval/code/bpb", "eval/web/loss", "eval/web/tokens"} <= set(keys)
    for key in keys:
        assert standalone[key] == pytest.approx(trained[key], rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize("override, match", [
    ("+eval.sets.x={kind: s3, dataset_path: /nowhere}", "Invalid value 's3', expected one of [local, hf]"),
    ("+eval.sets.x={kind: local, dataset_path: /no/such/dir}", "eval.sets.x.dataset_path=/no/such/dir does not"),
    ("+eval.sets.x={kind: local}", "eval.sets.x has no dataset_path"),
    ("+eval.sets.x={kind: hf}", "eval.sets.x has no name"),
])
def test_bad_set_is_one_error_line_before_the_model_loads(tmp_path, monkeypatch, tiny_hf_ckpt, tiny_token_shards,
                                                          capsys, override, match):
    monkeypatch.chdir(tmp_path)
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the sets were validated")

    monkeypatch.setattr("ckpteval.modes.loss.load_eval_model", no_model)
    cfg = factories.compose(["mode=loss", f"ckpt={tiny_hf_ckpt}", "data=local",
                             f"data.dataset_path={tiny_token_shards}", "tracking.enabled=false", override])
    with pytest.raises(SystemExit) as exc:
        app.main(cfg)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_empty_local_set_is_an_error(tmp_path, monkeypatch, tiny_hf_ckpt, tiny_token_shards, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.bin").write_bytes(b"")
    cfg = factories.compose(["mode=loss", f"ckpt={tiny_hf_ckpt}", "data=local", f"data.dataset_path={tiny_token_shards}",
                             "tracking.enabled=false", f"+eval.sets.e={{kind: local, dataset_path: '{tmp_path / 'empty'}'}}"])
    with pytest.raises(SystemExit):
        app.main(cfg)
    assert "hold no window" in capsys.readouterr().err


def test_byte_table_without_tokenizer_leaves_bpb_out(tmp_path, monkeypatch, tiny_token_shards, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = factories.make_hf_checkpoint(tmp_path / "step_3")  # no tokenizer beside it
    result = app.main(factories.compose(["mode=loss", f"ckpt={ckpt}", "data=local", "eval.seq_len=32",
                                         f"data.dataset_path={tiny_token_shards}", "tracking.enabled=false"]))
    assert "eval/bpb" not in result and "eval/loss" in result


# ---- every parallel layout under torchrun: the same numbers as one process ---------------------------------

LAYOUTS = {"fsdp": ["parallel=fsdp"], "tp": ["parallel=tp"], "pp": ["parallel=pp", "parallel.microbatches=2"]}


def _driver(spec_path: str) -> None:
    """Under torchrun: each job through app.main in this process; rank 0 keeps results and window files."""
    import os
    import sys

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    shutdown, app.shutdown = app.shutdown, lambda: None  # one process group for every job of the launch
    out = {}
    for name, args in spec["jobs"].items():
        print(f"[driver rank {rank}] job {name}", file=sys.stderr, flush=True)
        out[name] = app.main(factories.compose(args))
        if rank == 0:
            Path("window_nll.npz").rename(f"{name}_window_nll.npz")
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(out))
    shutdown()


@pytest.mark.slow
@pytest.mark.dist
def test_every_layout_under_torchrun_gives_the_single_process_numbers(tmp_path, monkeypatch, tiny_tokenizer_dir):
    import os
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    _, _, _, overrides = _setup(tmp_path, tiny_tokenizer_dir)
    base = [o for o in overrides if not o.startswith("eval.batch_size")] + ["eval.batch_size=4",
                                                                               "tracking.enabled=false"]
    jobs = {f"{layout}_{steps}": base + extra + [f"eval.steps={steps}"]
            for layout, extra in LAYOUTS.items() for steps in (-1, 3)}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs, "out": str(tmp_path / "dist.json")}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(factories.REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "-m", "tests.test_eval_sets", str(spec)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    dist_results = json.loads((tmp_path / "dist.json").read_text())
    for layout in LAYOUTS:
        for steps in (-1, 3):
            # eval.steps counts batches per data-parallel rank: fsdp's 2 ranks x 3 batches = 6 batches of one process
            single_steps = steps * 2 if steps > 0 and layout == "fsdp" else steps
            single = app.main(factories.compose(base + [f"eval.steps={single_steps}"]))
            windows = dict(np.load(tmp_path / "window_nll.npz"))
            got = dist_results[f"{layout}_{steps}"]
            keys = [k for k in single if k.startswith("eval/")]
            assert {"eval/bpb", "eval/code/bpb", "eval/web/bpb"} <= set(keys) and set(got) == set(single)
            for key in keys:
                assert got[key] == pytest.approx(single[key], rel=1e-5), (layout, steps, key)
            got_windows = np.load(tmp_path / f"{layout}_{steps}_window_nll.npz")
            for name, values in windows.items():  # same windows in the same order, whatever the layout
                np.testing.assert_allclose(got_windows[name], values, rtol=1e-5)


if __name__ == "__main__":
    import sys

    _driver(sys.argv[1])

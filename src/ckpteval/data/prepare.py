"""Turn a folder of text files into a BPE tokenizer and train/validation token shards (`mode=prepare`).

The demo corpus is this step applied to the Python standard library that ships with the interpreter (its
source: docstrings, comments and code), so every machine can build it offline without third-party text. The
result is cached: a second call with the same settings reuses it (`prepared.json` records them).

Layout of the output dir:  tokenizer/ (HF tokenizer dir)  train/shard_000.bin  validation/shard_000.bin
(uint16 tokens when the vocabulary fits, else uint32)  prepared.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpteval.errors import CkptEvalError
from ckpteval.fsutil import fresh_partial_dir, publish_dir

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"
SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "turtledemo"}


@dataclass
class PreparedCorpus:
    out: Path
    tokenizer_dir: Path
    train_dir: Path
    val_dir: Path
    train_tokens: int
    val_tokens: int
    vocab_size: int
    reused: bool


def _source_dir(prep_cfg) -> Path:
    if prep_cfg.source:
        src = Path(prep_cfg.source).expanduser()
        if not src.is_dir():
            raise CkptEvalError(f"prepare.source={prep_cfg.source} is not a directory of text files")
        return src
    return Path(sysconfig.get_paths()["stdlib"])


def _hash01(rel: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def _documents(src: Path, pattern: str, max_chars: int, seed: int) -> list[tuple[float, str]]:
    """(hash in [0, 1), text) of matching files in seeded-hash order (a capped corpus still mixes every part
    of the tree) until max_chars; unreadable and empty files are skipped."""
    files = []
    for f in src.glob(pattern):
        rel = f.relative_to(src)
        if f.is_file() and not SKIP_PARTS & set(rel.parts[:-1]):
            files.append((_hash01(rel.as_posix(), seed), f))
    docs, total = [], 0
    for u, f in sorted(files):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        docs.append((u, text))
        total += len(text)
        if total >= max_chars:
            break
    return docs


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)


def _write_split(texts: list[str], tokenizer, out: Path) -> int:
    out.mkdir(parents=True)
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    stream = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    stream.astype(dtype).tofile(out / "shard_000.bin")
    return int(stream.size)


def prepare_corpus(prep_cfg, default_out: str) -> PreparedCorpus:
    """Build (or reuse) the tokenizer and shards for `prep_cfg`; the output dir appears complete or not at all."""
    src = _source_dir(prep_cfg)
    out = Path(prep_cfg.out or default_out).expanduser().resolve()
    settings = {"source": str(src.resolve()), "glob": prep_cfg.glob, "vocab_size": prep_cfg.vocab_size,
                "val_fraction": prep_cfg.val_fraction, "max_chars": prep_cfg.max_chars, "seed": prep_cfg.seed,
                "python": sys.version.split()[0] if not prep_cfg.source else None}
    manifest = out / "prepared.json"
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if saved.get("settings") == settings:
            return _result(out, saved, reused=True)
        log.info("settings changed since %s was prepared: rebuilding it", out)
    docs = _documents(src, prep_cfg.glob, prep_cfg.max_chars, prep_cfg.seed)
    if not docs:
        raise CkptEvalError(f"no readable text files match prepare.glob='{prep_cfg.glob}' under {src}: fix "
                            "prepare.source or prepare.glob")
    # Every k-th document (in hash order) is held out: at least one, so small corpora still split.
    stride = max(2, round(1 / prep_cfg.val_fraction)) if prep_cfg.val_fraction > 0 else len(docs) + 1
    val = [t for i, (_, t) in enumerate(docs) if i % stride == 0]
    train = [t for i, (_, t) in enumerate(docs) if i % stride != 0]
    if not val or not train:
        raise CkptEvalError(f"{len(docs)} document(s) under {src} leave an empty train or validation split at "
                            f"prepare.val_fraction={prep_cfg.val_fraction}: add files or change the fraction")
    log.info("preparing %s: %d documents (%d validation), %s chars, BPE vocab %d", out, len(docs), len(val),
             f"{sum(len(t) for _, t in docs):,}", prep_cfg.vocab_size)
    tokenizer = _train_tokenizer(train, prep_cfg.vocab_size)  # never sees the held-out text
    tmp = fresh_partial_dir(out)
    tokenizer.save_pretrained(tmp / "tokenizer")
    info = {"settings": settings, "documents": len(docs), "validation_documents": len(val),
            "train_tokens": _write_split(train, tokenizer, tmp / "train"),
            "val_tokens": _write_split(val, tokenizer, tmp / "validation"), "vocab_size": len(tokenizer)}
    (tmp / "prepared.json").write_text(json.dumps(info, indent=2) + "\n")
    publish_dir(tmp, out)
    return _result(out, info, reused=False)


def _result(out: Path, info: dict, reused: bool) -> PreparedCorpus:
    return PreparedCorpus(out=out, tokenizer_dir=out / "tokenizer", train_dir=out / "train",
                          val_dir=out / "validation", train_tokens=info["train_tokens"],
                          val_tokens=info["val_tokens"], vocab_size=info["vocab_size"], reused=reused)


def ensure_demo_corpus(paths_cfg, prep_cfg) -> PreparedCorpus:
    """The demo corpus under `paths.demo_data`, built from the standard library at first use."""
    return prepare_corpus(prep_cfg, default_out=paths_cfg.demo_data)

"""`mode=prepare`: turn a folder of text files into train/validation token shards and a BPE tokenizer.

    python run.py mode=prepare                      # the demo corpus (Python stdlib) -> outputs/demo_corpus
    python run.py mode=prepare prepare.source=~/texts prepare.glob='**/*.txt' prepare.out=data/mytexts
    python run.py mode=train_eval data=local data.train_path=data/mytexts/train \
        data.dataset_path=data/mytexts/validation tokenizer=data/mytexts/tokenizer
"""

from __future__ import annotations

from typing import Any

from ckpteval.data.prepare import prepare_corpus


def run(cfg, job) -> dict[str, Any]:
    if not job.dist.is_main:
        return {}
    corpus = prepare_corpus(cfg.prepare, default_out=cfg.paths.demo_data)
    state = "reused" if corpus.reused else "built"
    print(f"{state} {corpus.out}: {corpus.train_tokens:,} train / {corpus.val_tokens:,} validation tokens, "
          f"vocab {corpus.vocab_size}\n"
          f"  train:      data.train_path={corpus.train_dir}\n"
          f"  validation: data.dataset_path={corpus.val_dir}\n"
          f"  tokenizer:  tokenizer={corpus.tokenizer_dir}", flush=True)
    return {"train_tokens": corpus.train_tokens, "val_tokens": corpus.val_tokens, "vocab_size": corpus.vocab_size}

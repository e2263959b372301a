"""Loaders for the project's offline lm-eval tasks: the data sits beside the YAML, so the tasks run anywhere
with no download (lm-eval calls ``custom_dataset`` with the task's metadata as keyword arguments)."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> list[dict]:
    with open(HERE / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(rows: list[dict]):
    import datasets

    splits: dict[str, list[dict]] = {}
    for row in rows:
        splits.setdefault(row.pop("split"), []).append(row)
    return datasets.DatasetDict({name: datasets.Dataset.from_list(items) for name, items in splits.items()})


def load_mc(**_metadata):
    """ckpteval_mc.jsonl -> {"train": few-shot examples, "test": scored examples}."""
    return _dataset(_rows("ckpteval_mc.jsonl"))


def load_rolling(**_metadata):
    """ckpteval_rolling.jsonl -> {"test": documents scored with loglikelihood_rolling}."""
    return _dataset(_rows("ckpteval_rolling.jsonl"))

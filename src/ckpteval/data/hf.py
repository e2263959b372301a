"""`data=hf`: a Hugging Face dataset loaded offline, tokenized and packed into one token stream.

Each document is tokenized without special tokens and followed by the EOS token; documents are concatenated in
dataset order and windowed like a local shard. Sources, tried in this order for `data.name`:
a `save_to_disk` dir, a dir or file of data files (json/jsonl/parquet/csv/txt), a hub name in the local cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ckpteval.data.windows import TokenWindows
from ckpteval.errors import CkptEvalError

log = logging.getLogger(__name__)
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".arrow": "arrow"}
HOW = ("make it available locally: a save_to_disk dir or data files (data.name=DIR_OR_FILE), or download it once "
       "into the Hugging Face cache on a machine with network")


def load_split(name: str | None, config: str | None, split: str):
    """One split of the dataset as a `datasets.Dataset`, without network access."""
    import datasets

    if not name:
        raise CkptEvalError("data.name is not set: give a save_to_disk dir, a data file/dir, or a cached hub name")
    path = Path(name).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            ds = datasets.load_from_disk(str(path))
        elif path.is_file():
            builder = BUILDERS.get(path.suffix)
            if builder is None:
                raise CkptEvalError(f"data.name={name}: unsupported file type {path.suffix} (use one of "
                                    f"{', '.join(BUILDERS)})")
            if split not in ("validation", "train"):  # the defaults of data.split / data.train_split
                raise CkptEvalError(f"data.name={name} is a single file, which has no split {split!r}: drop "
                                    f"data.split=..., or point data.name at a dir or save_to_disk dataset that has "
                                    f"a {split!r} split")
            ds = datasets.load_dataset(builder, data_files={split: str(path)})
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), config)
        else:
            ds = datasets.load_dataset(name, config)
    except CkptEvalError:
        raise
    except IndexError:  # datasets cannot open a saved dataset with zero rows
        raise CkptEvalError(f"dataset {name} is empty (a split with no rows): choose another data.split or "
                            "dataset") from None
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as e:
        if "split" in str(e).lower() and split in str(e):
            raise CkptEvalError(f"dataset {name} has no split {split!r}: set data.split ({e})") from None
        raise CkptEvalError(f"dataset {name!r} is not available offline ({type(e).__name__}: {str(e)[:200]}): "
                            f"{HOW}") from None
    if isinstance(ds, (datasets.DatasetDict, dict)):
        if split not in ds:
            raise CkptEvalError(f"dataset {name} has no split {split!r} (it has {sorted(ds)}): set data.split")
        ds = ds[split]
    return ds


def tokenize_stream(ds, text_field: str, tokenizer, name: str, split: str) -> np.ndarray:
    """All documents, each + EOS, concatenated into one int array."""
    if tokenizer is None:
        raise CkptEvalError("data=hf needs a tokenizer and none was found with the checkpoint: pass tokenizer=PATH "
                            "(a dir with tokenizer.json)")
    if len(ds) == 0:
        raise CkptEvalError(f"split {split!r} of dataset {name} is empty: choose another data.split or dataset")
    if text_field not in ds.column_names:
        raise CkptEvalError(f"dataset {name} has no column {text_field!r} (columns: {ds.column_names}): set "
                            "data.text_field")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CkptEvalError("the tokenizer has no EOS token, which separates documents: use a tokenizer with one")
    parts: list[np.ndarray] = []
    for start in range(0, len(ds), 1000):
        texts = ds[start:start + 1000][text_field]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray(ids + [eos], dtype=np.int64))
    stream = np.concatenate(parts)
    dtype = np.uint32 if int(stream.max()) < 2**32 else np.int64
    return stream.astype(dtype)


def load_hf_windows(data_cfg, split: str, tokenizer, seq_len: int) -> TokenWindows:
    ds = load_split(data_cfg.name, data_cfg.config, split)
    stream = tokenize_stream(ds, data_cfg.text_field, tokenizer, data_cfg.name, split)
    windows = TokenWindows([stream], seq_len, [f"{data_cfg.name}[{split}]"])
    if len(windows) == 0:
        raise CkptEvalError(f"split {split!r} of dataset {data_cfg.name} has {len(stream)} tokens, fewer than one "
                            f"window of {seq_len + 1}: use a smaller seq_len or more data")
    return windows

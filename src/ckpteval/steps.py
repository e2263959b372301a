"""How a checkpoint's name says its step, and which single files can be checkpoints: the one grammar that
`checkpoint.parse_step`, the watcher's discovery and the MLflow experiment naming (which dir is a training run)
all read names with.

    step_1200  step-1200  global_step1200  iter_0001200  checkpoint-1200  ckpt_1200  epoch=0-step=1200.ckpt

No imports beyond the standard library: the config layer (experiment names at compose time) uses it too.
"""

from __future__ import annotations

import re

STEP = re.compile(r"(?<![a-z0-9])(?:global_step|step|iter|checkpoint|ckpt)[_=-]?(\d+)(?![0-9])", re.IGNORECASE)
# Files that are a whole checkpoint on their own (GGUF, Lightning's .ckpt, nanoGPT's ckpt.pt); other loose files
# beside checkpoint dirs (configs, logs) are not checkpoints.
CHECKPOINT_FILE_SUFFIXES = (".gguf", ".ckpt", ".pt")


def step_in_name(name: str) -> int | None:
    """The step a name carries anywhere in it (`epoch=0-step=1200.ckpt` -> 1200), None when it carries none."""
    match = STEP.search(name)
    return int(match.group(1)) if match else None


def is_step_dir_name(name: str) -> bool:
    """A name that ends in its step (`step_1200`, `iter_0001200`) or is a bare number (`1200`): a dir per step."""
    match = STEP.search(name)
    return (match is not None and match.end() == len(name)) or name.isdigit()


def is_checkpoint_file(name: str) -> bool:
    return name.endswith(CHECKPOINT_FILE_SUFFIXES)

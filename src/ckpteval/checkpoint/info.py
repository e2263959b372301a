"""`CheckpointInfo`: what `inspect_checkpoint` found out about a checkpoint path, handed to every loader.

Its own module so that the format families, the loader and the detector can all name it without importing
each other (detect -> formats, load -> formats, never back).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckpteval.checkpoint.formats.base import CheckpointFormat


@dataclass
class CheckpointInfo:
    path: Path  # the checkpoint dir or file (resolved: a dir holding one .gguf gives the .gguf)
    format: str  # the family's name: "hf" | "dcp" | "gguf" | "nanogpt" | "lightning" | ...
    step: int | None
    tokens_seen: int | None
    config_dir: Path | None  # where config.json was found in or beside the checkpoint (None = none there)
    tokenizer_path: Path | None  # dir, tokenizer.json file, or the .gguf file itself
    dcp_prefix: str | None = None  # DCP dirs with HF names: the key prefix ("model." or ""); None = not such a DCP
    family: CheckpointFormat | None = None  # the family object (architecture, tensor_specs, read_state)
    arch_source: str | None = None  # where the architecture came from, once `build_config` resolved it
    ckpt_config: Path | None = None  # the config.json `ckpt_config=` names: the architecture, whatever the family says
    base: CheckpointInfo | None = None  # an adapter's base checkpoint (inspected like any); None for a whole model

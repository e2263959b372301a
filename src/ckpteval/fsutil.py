"""Directories that appear complete or not at all: write into a hidden sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def partial_dir(final: Path) -> Path:
    """The temp name `final` is written under; deterministic so every rank writes into the same dir."""
    final = Path(final)
    return final.parent / f".{final.name}.partial"


def fresh_partial_dir(final: Path) -> Path:
    tmp = partial_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, final: Path) -> None:
    """Atomically move a finished temp dir into place (replacing an older dir at the same path)."""
    final = Path(final)
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)

"""Small filesystem rules used across layers: directories (and JSON files) that appear complete or not at all
(write a hidden sibling, then rename into place), whether a process still runs, whether a path is a glob."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


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


def write_json_atomic(path: Path, obj: Any) -> None:
    """Readers see the old file or the new one, never a torn write (also across a power cut: fsync first)."""
    import json
    import threading

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    """Whether a local process still runs (for lock and running-marker files that name their writer's pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def has_glob(text: str) -> bool:
    """Whether `text` holds glob syntax (`*`, `?`, `[`): a pattern to expand, not a literal name."""
    return any(c in text for c in "*?[")

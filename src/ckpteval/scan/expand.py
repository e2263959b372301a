"""A scan's jobs: `key=glob:PATTERN` values become one job per complete checkpoint, in step order.

    python run.py -m mode=loss ckpt='glob:ckpts/step_*'                  # one job per complete checkpoint
    python run.py -m mode=loss,harness ckpt='glob:ckpts/step_*'          # x every other sweep (cartesian)

A glob value, on the command line or in `hydra.sweeper.params`, becomes one value per match, quoted for Hydra's
override grammar (paths with commas, spaces, quotes, `${`), so it combines with any other sweep like a comma list
does. Matches that are not complete checkpoints (a save still running, a crashed copy, a corrupt file) are
skipped with a warning and kept as `Skipped`, so the summary accounts for every match. Used by the sweeper plugin
(`hydra_plugins/ckpteval_sweeper`).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpteval.errors import CkptEvalError

log = logging.getLogger("ckpteval.sweep")

GLOB_PREFIX = "glob:"
PARENT_KEY = "tracking.parent_run_id"


@dataclass(frozen=True)
class Skipped:
    """A match that is no complete checkpoint: a row of the summary, never a job."""

    ckpt: str
    reason: str


@dataclass
class Matches:
    complete: list[str] = field(default_factory=list)  # absolute paths (or URLs), in step order
    skipped: list[Skipped] = field(default_factory=list)


def quote_value(value: str) -> str:
    """`value` as a single-quoted Hydra override value that parses (and resolves) back to exactly `value`.

    Inside quotes commas, spaces, brackets, `=`, `#` and non-ASCII need nothing; a quote (and the backslashes
    before it) and a trailing backslash are escaped for Hydra's lexer, and `${` for OmegaConf, which would
    otherwise read it as an interpolation."""
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    body = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", body)
    trailing = len(body) - len(body.rstrip("\\"))
    return "'" + body + "\\" * trailing + "'"


def natural_key(text: str) -> list:
    """Sort key comparing the numbers in a name as numbers (step_20 before step_100)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def step_order_key(path: str) -> tuple:
    """Checkpoints with a step first, by step; then by name with numbers compared as numbers."""
    from ckpteval.checkpoint import parse_step

    step = parse_step(path)
    return (step is None, step if step is not None else 0, natural_key(path))


def every_nth(items: list, n: int) -> list:
    """Items 0, n, 2n, ... and always the last one (the newest checkpoint is the one people ask about)."""
    if n <= 1 or not items:
        return list(items)
    picked = items[::n]
    return picked if picked[-1] is items[-1] else picked + [items[-1]]


def _absolute_pattern(pattern: str, cwd: Path) -> str:
    """Anchor a relative pattern at cwd; cwd and the home dir are literal text, not glob syntax."""
    if pattern.startswith("~"):
        head, sep, tail = pattern.partition("/")
        return glob.escape(os.path.expanduser(head)) + sep + tail
    if os.path.isabs(pattern):
        return pattern
    return os.path.join(glob.escape(str(cwd)), pattern)


def match_pattern(pattern: str, *, cwd: str | Path | None = None, skip_incomplete: bool = True) -> Matches:
    """Every match of `pattern` in step order: the complete checkpoints, and the skipped ones with the reason
    (per ``checkpoint.check_complete``; each logged as a warning). No match at all, or no complete one, is an
    error naming the pattern and the dir searched."""
    cwd = Path(cwd or os.getcwd())
    if not pattern:
        raise CkptEvalError("ckpt=glob: has no pattern: write ckpt='glob:DIR/step_*'")
    from ckpteval.checkpoint.listing import entry_complete, list_checkpoints

    remote = "://" in pattern  # glob:s3://bucket/run/step_*: the store's listing (fsspec)
    entries = {e.path: e for e in list_checkpoints(pattern if remote else _absolute_pattern(pattern, cwd))}
    paths = sorted(entries, key=step_order_key)
    if not paths:
        raise CkptEvalError(f"glob:{pattern} matches nothing (relative paths are searched from {cwd}): check the "
                            f"pattern, and quote it (ckpt='glob:{pattern}') so the shell passes it unexpanded")
    if not skip_incomplete:
        return Matches(complete=paths)
    found = Matches()
    for path in paths:
        ok, reason = entry_complete(entries[path])
        if ok:
            found.complete.append(path)
        else:
            found.skipped.append(Skipped(path, reason))
            log.warning("skipping incomplete checkpoint %s: %s", path, reason)
    if not found.complete:
        raise CkptEvalError(f"glob:{pattern} matches {len(paths)} path(s) under {cwd} but no complete checkpoint "
                            f"(first: {found.skipped[0].reason}); point the pattern at checkpoint dirs (HF, DCP "
                            f"step_N) or .gguf files")
    return found


def expand_pattern(pattern: str, *, cwd: str | Path | None = None, every: int = 1,
                   skip_incomplete: bool = True) -> list[str]:
    """Absolute paths of the complete checkpoints matching `pattern`, in step order (every Nth if every > 1)."""
    return every_nth(match_pattern(pattern, cwd=cwd, skip_incomplete=skip_incomplete).complete, every)


def _element_text(value: Any) -> str | None:
    """The plain string of a parsed override element (quoted or not), None for non-strings."""
    from hydra.core.override_parser.types import QuotedString

    if isinstance(value, QuotedString):
        return value.text
    return value if isinstance(value, str) else None


def job_override_lists(overrides: Iterable, expand: Callable[[str], list[str]],
                       parent_run_id: str | None = None) -> list[list[str]]:
    """For each key, the `key=value` strings its jobs take: glob values expanded by `expand(pattern)`, every
    other value written back as Hydra's BasicSweeper writes it. The jobs are the cartesian product of the lists.

    `parent_run_id` pins `tracking.parent_run_id` for every job (the scan's MLflow parent run)."""
    from hydra.core.override_parser.types import Override, Transformer

    last: dict[str, Override] = {}
    for override in overrides:  # a command-line value replaces the sweep file's (hydra.sweeper.params) one
        assert isinstance(override, Override)
        last[override.get_key_element()] = override
    per_key: dict[str, list[str]] = {}
    for key, override in last.items():
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise CkptEvalError(f"{override.input_line}: interval sweeps need an optimizing sweeper; list the "
                                    f"values (a,b,c), use range(start,stop,step) or glob:PATTERN")
            elements = list(override.sweep_iterator())  # one pass: shuffle() must not reorder twice
        else:
            elements = [override._value]  # the parsed element (QuotedString kept), as Hydra's sweeper reads it
        values: list[str] = []
        for element in elements:
            text = _element_text(element)
            if text is not None and text.startswith(GLOB_PREFIX):
                values += [quote_value(path) for path in expand(text[len(GLOB_PREFIX):])]
            else:
                values.append(Transformer.str(element) if override.is_sweep_override()
                              else override.get_value_element_as_str())
        per_key[key] = [f"{key}={v}" for v in dict.fromkeys(values)]  # a checkpoint matched twice runs once
    if parent_run_id:
        per_key.pop(PARENT_KEY, None)
        per_key[PARENT_KEY] = [f"{PARENT_KEY}={quote_value(parent_run_id)}"]
    return list(per_key.values())

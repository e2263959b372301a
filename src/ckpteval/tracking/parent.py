"""A scan's parent MLflow run: every job's run nests under it; the summary (table, CSV, plot) is logged to it.

The sweeper (which expands the checkpoint patterns) and the sweep callback (which opens and finishes the
parent) run in one process; this module holds the one open parent between them. It is a ``Run`` like any other,
so it has a running marker (a SIGKILL'd scan's parent is ended on the next start) and goes to the outbox when
the store fails.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ckpteval.tracking.run import Run, open_run

log = logging.getLogger("ckpteval.sweep")
_open: dict[str, Any] = {}  # {"run": Run, "name": str} while a scan's parent run is open


def open_parent(tracking_cfg, name: str, tags: Mapping[str, Any]) -> Run:
    run = open_run(tracking_cfg, name, {"ckpteval.sweep": "true", **tags})
    _open.update(run=run, name=name)
    return run


def current() -> tuple[Run, str] | None:
    return (_open["run"], _open["name"]) if _open else None


def parent_run_id() -> str | None:
    return _open["run"].run_id if _open else None


def take() -> tuple[Run, str] | None:
    """Hand the open parent to the caller that ends it (no other path ends it twice)."""
    found = current()
    _open.clear()
    return found


def end_parent(status: str, error: str | None = None) -> None:
    """End the open parent run early (the sweep itself failed or was stopped)."""
    found = take()
    if found is None:
        return
    try:
        found[0].end(status, error)
    except Exception as exc:  # noqa: BLE001 - the sweep's own error is the one to report
        log.warning("could not mark the sweep's MLflow run %s %s: %s", found[0].run_id, status, exc)

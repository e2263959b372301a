"""Nothing a finished job measured is lost when the tracking store goes away.

The outbox is a local dir (``tracking.outbox``, default ``<paths.outputs>/tracking_outbox``) with
- ``running/<run_id>.json``: one marker per open run (uri, pid, host), removed when the run is ended. A marker
  whose process is dead (SIGKILL, power loss) means a run left RUNNING: the next replay ends it KILLED;
- ``pending/<run_id>.json``: what a run still owes the store after it went away: queued metrics (with their
  original timestamps, so a repeated write is a no-op in MLflow), params, tags, artifacts (copied beside the
  entry), the final status, and the results.json to put in place once all of it is delivered;
- ``replayed/<run_id>.json``: the record of each delivered entry (what was replayed, when).

Replay (``replay_outbox``) runs at the start of every tracked job, on every watcher poll, and as
``python run.py mode=replay``. It applies an entry's operations in order and saves how many are done after
each, so a replay interrupted half-way resumes where it stopped and nothing is logged twice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from ckpteval.fsutil import pid_alive, write_json_atomic

log = logging.getLogger("ckpteval.tracking")
DEFAULT_DIR = "outputs/tracking_outbox"


def outbox_dir(tracking_cfg) -> Path:
    value = getattr(tracking_cfg, "outbox", None) or DEFAULT_DIR
    return Path(str(value)).expanduser().resolve()


class Outbox:
    def __init__(self, root: Path):
        self.root = Path(root)

    # -- running markers
    def mark_running(self, uri: str, run_id: str, name: str) -> None:
        write_json_atomic(self.root / "running" / f"{run_id}.json",
                    {"uri": uri, "run_id": run_id, "name": name, "pid": os.getpid(),
                     "host": socket.gethostname(), "started": time.time()})

    def clear_running(self, run_id: str) -> None:
        (self.root / "running" / f"{run_id}.json").unlink(missing_ok=True)

    # -- pending entries
    def entry_path(self, run_id: str) -> Path:
        return self.root / "pending" / f"{run_id}.json"

    def load_entry(self, uri: str, run_id: str) -> dict[str, Any]:
        path = self.entry_path(run_id)
        if path.exists():
            return json.loads(path.read_text())
        return {"uri": uri, "run_id": run_id, "ops": [], "done": 0, "end": None, "results": None,
                "created": time.time()}

    def save_entry(self, entry: dict[str, Any]) -> Path:
        path = self.entry_path(entry["run_id"])
        write_json_atomic(path, entry)
        return path

    def stash_file(self, run_id: str, src: Path) -> Path:
        """Copy a file/dir an operation needs beside the entry (the original may be temporary)."""
        dest = self.root / "pending" / run_id / uuid.uuid4().hex[:8] / Path(src).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
        return dest


def replay_outbox(tracking_cfg) -> int:
    """Deliver what the outbox holds for this store; returns how many runs were completed.

    Entries for another store, and entries whose store still does not answer, stay for a later replay. Never
    raises for a store that is down (returns what it managed)."""
    if not getattr(tracking_cfg, "enabled", True):
        return 0
    from ckpteval.tracking.store import make_client, resolve_tracking_uri, server_answers

    box = Outbox(outbox_dir(tracking_cfg))
    if not box.root.is_dir():
        return 0
    uri = resolve_tracking_uri(tracking_cfg.uri)
    entries = sorted((box.root / "pending").glob("*.json"))
    orphans = _dead_markers(box, uri)
    if not (entries or orphans) or not server_answers(uri, tracking_cfg.timeout_s):
        return 0
    client = make_client(uri, tracking_cfg.timeout_s)
    done = 0
    for path in entries:
        entry = json.loads(path.read_text())
        if entry.get("uri") != uri or (entry.get("end") is None and _owner_alive(box, entry["run_id"])):
            continue  # another store's, or a run still going on (its own process delivers the end)
        try:
            _deliver(client, box, entry)
        except Exception as exc:
            log.warning("replaying MLflow run %s failed (%s: %s): kept in %s for the next try", entry["run_id"],
                        type(exc).__name__, str(exc)[:200], path, exc_info=True)
            break
        done += 1
    for marker in orphans:
        if not (box.root / "running" / f"{marker['run_id']}.json").exists():
            continue  # its pending entry was delivered above, which ended the run
        if box.entry_path(marker["run_id"]).exists():
            continue  # its entry is still undelivered: it ends the run when it is
        try:
            _end_orphan(client, marker)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not end MLflow run %s (%s): retrying on the next start", marker["run_id"], exc)
            continue
        box.clear_running(marker["run_id"])
        done += 1
    return done


def _owner_alive(box: Outbox, run_id: str) -> bool:
    try:
        marker = json.loads((box.root / "running" / f"{run_id}.json").read_text())
    except (OSError, ValueError):
        return False
    return marker.get("host") != socket.gethostname() or pid_alive(int(marker.get("pid", 0)))


def _dead_markers(box: Outbox, uri: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted((box.root / "running").glob("*.json")):
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        same_host = marker.get("host") == socket.gethostname()
        if marker.get("uri") == uri and same_host and not pid_alive(int(marker.get("pid", 0))):
            out.append(marker)
    return out


def _end_orphan(client, marker: dict[str, Any]) -> None:
    run = client.get_run(marker["run_id"])
    if run.info.status == "RUNNING":
        client.set_tag(marker["run_id"], "error", "the job's process died during this run (ended on a later start)")
        client.set_terminated(marker["run_id"], "KILLED")
        log.warning("ended MLflow run %s (%s) KILLED: its process (pid %s) died while it ran", marker["run_id"],
                    marker.get("name"), marker.get("pid"))


def _deliver(client, box: Outbox, entry: dict[str, Any]) -> None:
    """Apply the entry's remaining operations, end the run, put results.json in place, file the record."""
    from mlflow.entities import Metric, Param

    run_id = entry["run_id"]
    ops = entry["ops"]
    while entry["done"] < len(ops):
        kind, payload = ops[entry["done"]]
        if kind == "metrics":
            client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in payload])
        elif kind == "params":
            client.log_batch(run_id, params=[Param(k, v) for k, v in payload.items()])
        elif kind == "tags":
            for key, value in payload.items():
                client.set_tag(run_id, key, value)
        elif kind == "artifact":
            src, artifact_path = payload
            (client.log_artifacts if Path(src).is_dir() else client.log_artifact)(run_id, src, artifact_path)
        entry["done"] += 1
        box.save_entry(entry)
    end = entry.get("end") or {"status": "KILLED", "error": "the job stopped while the store was away"}
    if client.get_run(run_id).info.status == "RUNNING":
        if end.get("error"):
            client.set_tag(run_id, "error", end["error"][:5000])
        client.set_terminated(run_id, end["status"])
    results = entry.get("results")
    if results and end["status"] == "FINISHED":
        dest = Path(results["dest"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(results["src"], dest.with_name(dest.name + ".tmp"))
        os.replace(dest.with_name(dest.name + ".tmp"), dest)
    box.clear_running(run_id)
    entry["replayed"] = time.time()
    write_json_atomic(box.root / "replayed" / f"{run_id}.json", entry)
    box.entry_path(run_id).unlink(missing_ok=True)
    shutil.rmtree(box.root / "pending" / run_id, ignore_errors=True)
    log.warning("replayed MLflow run %s: %d queued operation(s) delivered, ended %s%s", run_id, len(ops),
                end["status"], f", results in {results['dest']}" if results and end["status"] == "FINISHED" else "")

"""Exactly-once bookkeeping: the local ledger, the MLflow view of what is done, and the single-watcher lock.

A (checkpoint, evaluation) pair is done when either
  - the ledger in `watch.state_dir` says so (written atomically: tmp file + fsync + os.replace), or
  - MLflow holds a FINISHED run tagged `mode=watch`, `ckpt_identity=<hash>`, `evaluation=<name>`.
The watcher writes MLflow first, the ledger second, so a crash between the two leaves MLflow ahead: the
next look at MLflow finds the run and the pair is not evaluated again. A pair is marked failed only after
`watch.max_attempts` attempts; attempts are counted when an evaluation starts, so a checkpoint that kills
the process (out of memory) is not retried forever either.

The lock covers the watched dir, not the state dir, so two watchers of one `watch.dir` with different
`watch.state_dir`s never both evaluate (`lock_for`): for a local dir it is `<watch.dir>/.ckpteval_watch/lock.json`
whatever `watch.state_dir` says (or, when the watched dir is read-only, a file keyed by its resolved path in
the host's temp dir); for a URL it is a lock object `<URL>/.ckpteval_watch/lock.json` in the store itself,
written then read back (stores have no exclusive create, so two watchers starting within the same instant
could both believe they won for one heartbeat: the loser sees the other token at its first heartbeat and
stops, and the MLflow check before every evaluation skips pairs already FINISHED).
A local lock is created with O_EXCL and its heartbeat refreshed by a thread; a lock whose owner is dead (same
host) or whose heartbeat is older than `watch.lock_stale_s` is taken over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from enum import Enum
from pathlib import Path
from typing import Any

from ckpteval.errors import CkptEvalError
from ckpteval.fsutil import pid_alive, write_json_atomic  # noqa: F401 - write_json_atomic re-exported
from ckpteval.tracking.view import MlflowView, pair_key  # noqa: F401 - re-exported: the watcher's MLflow queries

log = logging.getLogger("ckpteval.watch")

class Status(str, Enum):
    """A pair's ledger status (stored as its plain string)."""

    STARTED = "started"  # an attempt began (counted in `attempts`); a retry waits after a failed one
    DONE = "done"
    FAILED = "failed"  # watch.max_attempts attempts failed: final until watch.retry_failed=true
    SKIPPED = "skipped"  # the checkpoint went away before it was done: final (a new copy is a new identity)

    __str__ = str.__str__


DONE, FAILED, STARTED, SKIPPED = Status.DONE, Status.FAILED, Status.STARTED, Status.SKIPPED
FINAL = (DONE, FAILED, SKIPPED)  # a pair in one of these is never evaluated again


class Ledger:
    """`ledger.json`: {pair key: {status, ckpt, step, evaluation, attempts, run_id, error, metrics, time}}."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "ledger.json"
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.entries = dict(data.get("entries", {}))
            except (OSError, ValueError, AttributeError) as exc:
                raise CkptEvalError(f"watch ledger {self.path} is unreadable ({exc}): move it aside and restart; "
                                    "finished evaluations are recovered from MLflow") from None

    def get(self, identity: str, evaluation: str) -> dict[str, Any] | None:
        return self.entries.get(pair_key(identity, evaluation))

    def status(self, identity: str, evaluation: str) -> str | None:
        entry = self.get(identity, evaluation)
        return entry["status"] if entry else None

    def attempts(self, identity: str, evaluation: str) -> int:
        entry = self.get(identity, evaluation)
        return int(entry.get("attempts", 0)) if entry else 0

    def record(self, identity: str, evaluation: str, status: Status, **fields: Any) -> None:
        key = pair_key(identity, evaluation)
        entry = {**self.entries.get(key, {}), **fields, "status": status, "evaluation": evaluation,
                 "identity": identity, "time": time.time()}
        self.entries[key] = entry
        self.save()

    def forget(self, identity: str, evaluation: str) -> None:
        if self.entries.pop(pair_key(identity, evaluation), None) is not None:
            self.save()

    def restore(self, identity: str, evaluation: str, entry: dict[str, Any] | None) -> None:
        """Put back the entry as it was before an aborted attempt (or remove it if there was none)."""
        if entry:
            self.entries[pair_key(identity, evaluation)] = dict(entry)
            self.save()
        else:
            self.forget(identity, evaluation)

    def retry_failed(self) -> int:
        """Give every pair recorded failed another round of attempts (watch.retry_failed=true); how many."""
        failed = [e for e in self.entries.values() if e.get("status") == FAILED]
        for entry in failed:
            entry.update(status=STARTED, attempts=0)
        if failed:
            self.save()
        return len(failed)

    def count(self, status: str) -> int:
        return sum(1 for e in self.entries.values() if e.get("status") == status)

    def save(self) -> None:
        write_json_atomic(self.path, {"version": 1, "entries": self.entries})


# ---------------------------------------------------------------------------------------------- lock


class WatchLock:
    """One watcher per state dir. `acquire()` -> True when ours; `lost` turns True if another process took it.

    The lock is a JSON file (pid, host, token, heartbeat) created exclusively and refreshed by a heartbeat thread;
    `RemoteWatchLock` keeps the same object in an fsspec store through the `_read_bytes`/`_write`/`_remove` hooks.
    """

    unknown_beat: str | None = None  # verdict when a holder's heartbeat cannot be read (local: judge by mtime)

    def __init__(self, state_dir: Path, stale_s: float, heartbeat_s: float):
        self.path = Path(state_dir) / "lock.json"
        self.stale_s = float(stale_s)
        self.heartbeat_s = max(0.05, min(float(heartbeat_s), self.stale_s / 4))
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.status: dict[str, Any] = {}  # extra fields the heartbeat publishes (current evaluation, counts)

    # -- storage hooks (a local file here)
    def _read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def _write(self) -> None:
        write_json_atomic(self.path, self._content())

    def _remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _last_beat(self, holder: dict[str, Any]) -> float | None:
        try:
            return float(holder.get("heartbeat") or self.path.stat().st_mtime)  # torn file: its mtime
        except (OSError, TypeError, ValueError):
            return None

    # -- reading
    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self._read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # torn/garbled: judged by `_last_beat`

    def stale_reason(self, holder: dict[str, Any] | None) -> str | None:
        """Why the current holder no longer counts (dead pid on this host, old heartbeat), or None if it does."""
        if holder is None:
            return "no lock"
        if holder.get("host") == self.host and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"]):
            return f"holder pid {holder['pid']} on {self.host} is dead"
        beat = self._last_beat(holder)
        if beat is None:
            return self.unknown_beat
        age = time.time() - beat
        if age > self.stale_s:
            return f"heartbeat {age:.0f}s old (> watch.lock_stale_s={self.stale_s:g})"
        return None

    def describe(self, holder: dict[str, Any] | None) -> str:
        if not holder:
            return "an unknown process"
        return f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('started_at', '?')})"

    # -- acquiring
    def _content(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": self.host, "token": self.token, "heartbeat": time.time(),
                "started_at": getattr(self, "_started_at", None), **self.status}

    def _create(self) -> bool:
        self._started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self._content()))
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> bool:
        """Create the lock, or take over a stale one; True when it is ours (its heartbeat then runs)."""
        if not self._create():
            holder = self.read()
            reason = self.stale_reason(holder)
            if reason is None or not self._take_over(holder, reason):
                return False
        self._start_heartbeat()
        return True

    def _take_over(self, holder: dict[str, Any] | None, reason: str) -> bool:
        """Move the stale file aside under a name only we use, check it is the one we judged stale (not a fresh
        lock another watcher created meanwhile), then create ours with O_EXCL again."""
        aside = self.path.with_name(f".lock.{self.token}.stale")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            pass
        else:
            moved = self.read_file(aside)
            if holder and moved and moved.get("token") != holder.get("token"):
                try:  # we moved a live lock: put it back unless someone already holds the path
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                return False
            aside.unlink(missing_ok=True)
        log.warning("taking over the watch lock %s from %s: %s", self.path, self.describe(holder), reason)
        return self._create()

    @staticmethod
    def read_file(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None

    # -- holding
    def _start_heartbeat(self) -> None:
        self.lost = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="ckpteval-watch-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Refresh our heartbeat; notice when another watcher took the lock over (we were judged stale)."""
        current = self.read()
        if current is None or (current != {} and current.get("token") != self.token):
            if not self.lost:
                log.error("lost the watch lock %s to %s: stopping after the current step", self.path,
                          self.describe(current))
            self.lost = True
            return
        try:
            self._write()
        except OSError as exc:
            log.warning("could not refresh the watch lock heartbeat: %s", exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        current = self.read()
        if current and current.get("token") == self.token:
            self._remove()


class RemoteWatchLock(WatchLock):
    """The same lock as a JSON object in an fsspec store (`s3://bucket/run/.ckpteval_watch/lock.json`). An
    object store has no exclusive create: the last writer wins, and every writer reads back who that was."""

    unknown_beat = "unreadable lock"

    def __init__(self, url_dir: str, stale_s: float, heartbeat_s: float):
        import fsspec

        super().__init__(Path("/nonexistent"), stale_s, heartbeat_s)
        self.fs, root = fsspec.core.url_to_fs(url_dir)
        self.key = f"{root.rstrip('/')}/lock.json"
        self.path = url_dir.rstrip("/") + "/lock.json"  # shown in messages

    def _read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    def _write(self) -> None:
        self.fs.pipe_file(self.key, json.dumps(self._content()).encode())

    def _remove(self) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            pass

    def _last_beat(self, holder: dict[str, Any]) -> float | None:
        try:
            return float(holder.get("heartbeat"))
        except (TypeError, ValueError):
            return None

    def _create(self) -> bool:
        self._started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
        if self.read() is not None:
            return False
        self._write()
        return (self.read() or {}).get("token") == self.token  # read back: the last writer wins

    def _take_over(self, holder: dict[str, Any] | None, reason: str) -> bool:
        log.warning("taking over the watch lock %s from %s: %s", self.path, self.describe(holder), reason)
        self._write()
        return (self.read() or {}).get("token") == self.token  # read back: the last writer wins


def lock_for(watch_dir: str, local: bool, stale_s: float, heartbeat_s: float) -> WatchLock:
    """The lock of a watched dir (see the module docstring): shared by every watcher of that dir."""
    if not local:
        return RemoteWatchLock(watch_dir.rstrip("/") + "/.ckpteval_watch", stale_s, heartbeat_s)
    resolved = Path(watch_dir.removeprefix("file://")).expanduser().resolve()
    in_dir = resolved / ".ckpteval_watch"
    try:
        in_dir.mkdir(parents=True, exist_ok=True)
        if os.access(in_dir, os.W_OK):
            return WatchLock(in_dir, stale_s, heartbeat_s)
    except OSError:
        pass
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    shared = Path(tempfile.gettempdir()) / "ckpteval-watch-locks" / digest
    log.warning("%s is not writable: the watch lock is %s/lock.json, which excludes other watchers of this dir on "
                "this host only", resolved, shared)
    return WatchLock(shared, stale_s, heartbeat_s)

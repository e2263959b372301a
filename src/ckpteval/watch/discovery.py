"""Find the checkpoints under `watch.dir` that are complete and no longer changing.

One recursive listing per look (fsspec: a local dir, `file://`, `s3://`, `gs://`, ...). Every top-level entry
whose name carries a step (`step_1200`, `global_step1200`, `iter_0001200`, `step_1200.gguf`) is a candidate;
hidden entries (`.step_1200.partial` of an atomic saver, our own `.ckpteval_watch`) are not. A candidate is
ready when
  1. it is complete: `checkpoint.check_complete` (DCP `.metadata` and the files it names, HF index shards all
     present, safetensors not truncated, GGUF parses) for local dirs; for remote URLs the same markers are
     read from the listing and the full check runs on the downloaded copy;
  2. it is stable: every file's size (and mtime/etag where the store has one) is unchanged across two looks at
     least `watch.stable_s` apart, so a trainer still writing (or a slow copy) is never picked up half-way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ckpteval.checkpoint import check_complete, checkpoint_identity, parse_step
from ckpteval.checkpoint.detect import file_step
from ckpteval.errors import CkptEvalError

log = logging.getLogger("ckpteval.watch")

READY, UNSTABLE, INCOMPLETE = "ready", "unstable", "incomplete"
VERSION_KEYS = ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag", "md5Hash")
Snapshot = tuple  # ((relative name, size, version), ...) sorted


@dataclass
class Candidate:
    name: str  # entry name under watch.dir (step_1200, model_step_1200.gguf)
    url: str  # local path, or the fsspec URL for remote stores
    step: int | None
    snapshot: Snapshot = ()
    state: str = INCOMPLETE  # ready | unstable | incomplete
    reason: str = ""  # why incomplete/unstable
    identity: str | None = None  # set when ready

    @property
    def files(self) -> list[str]:
        return [rel for rel, _, _ in self.snapshot]


@dataclass
class _Seen:
    snapshot: Snapshot
    since: float  # clock time of the first look with this snapshot
    complete: bool | None = None
    reason: str = ""
    identity: str | None = None


@dataclass
class Discovery:
    """Stateful across looks: remembers each candidate's last snapshot to judge stability."""

    root: str
    stable_s: float
    clock: Callable[[], float] = time.monotonic
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _ignored: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.fs, path = fsspec.core.url_to_fs(self.root)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root_path = path.rstrip("/") or "/"
        if self.local:
            self.root_path = str(Path(self.root_path).expanduser().resolve())
        self.protocol = None if self.local else (self.fs.protocol[0] if isinstance(self.fs.protocol, (tuple, list))
                                                  else self.fs.protocol)

    # ------------------------------------------------------------------------------------------ listing

    def exists(self) -> bool:
        try:
            return self.fs.isdir(self.root_path)
        except Exception:  # noqa: BLE001 - remote stores raise their own types for missing buckets
            return False

    def url_of(self, name: str) -> str:
        path = f"{self.root_path.rstrip('/')}/{name}"
        return path if self.local else f"{self.protocol}://{path}"

    def _listing(self) -> dict[str, list[tuple[str, int, str]]]:
        """{top-level entry: [(path relative to the entry, size, version), ...]} from one recursive listing."""
        try:
            found = self.fs.find(self.root_path, withdirs=False, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root_path.rstrip("/") + "/"
        groups: dict[str, list[tuple[str, int, str]]] = {}
        for path, info in found.items():
            path = path if self.local else self.fs._strip_protocol(path)
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            top, _, inner = rel.partition("/")
            if top.startswith("."):
                continue
            if not inner and not top.endswith((".gguf", ".ckpt", ".pt")):
                continue  # loose files at the top (a run's config.json, logs) are not checkpoints (Lightning's
                # epoch=0-step=10.ckpt and nanoGPT's ckpt.pt are)
            version = next((str(info[k]) for k in VERSION_KEYS if info.get(k) is not None), "")
            groups.setdefault(top, []).append((inner or top, int(info.get("size") or 0), version))
        return groups

    # ------------------------------------------------------------------------------------------ looking

    def look(self) -> list[Candidate]:
        """Every candidate with its state; a snapshot unchanged for stable_s and complete is READY."""
        now = self.clock()
        out = []
        groups = self._listing()
        for name, files in sorted(groups.items()):
            step = parse_step(name)
            if step is None and self.local:  # nanoGPT's one ckpt.pt, overwritten in place: its iter_num
                step = file_step(self.url_of(name))
            if step is None:
                if name not in self._ignored:
                    self._ignored.add(name)
                    log.info("ignoring %s: no step in its name (step_N, global_stepN, iter_N)", self.url_of(name))
                continue
            cand = Candidate(name=name, url=self.url_of(name), step=step, snapshot=tuple(sorted(files)))
            seen = self._seen.get(name)
            if seen is None or seen.snapshot != cand.snapshot:
                seen = self._seen[name] = _Seen(cand.snapshot, now)
            if seen.complete is None:  # once per snapshot: completeness cannot change while files do not
                seen.complete, seen.reason = self._complete(cand)
            if not seen.complete:
                cand.state, cand.reason = INCOMPLETE, seen.reason
            elif now - seen.since < self.stable_s:
                cand.state = UNSTABLE
                cand.reason = f"files changed {now - seen.since:.1f}s ago (waiting for watch.stable_s={self.stable_s:g})"
            else:
                if seen.identity is None:
                    seen.identity = self._identity(cand)
                cand.state, cand.identity = READY, seen.identity
            out.append(cand)
        for gone in set(self._seen) - set(groups):
            del self._seen[gone]
        return out

    def next_stable_in(self) -> float | None:
        """Seconds until the soonest complete-but-unstable candidate could be judged stable."""
        now = self.clock()
        waits = [s.since + self.stable_s - now for s in self._seen.values() if s.complete and s.identity is None]
        return max(0.0, min(waits)) if waits else None

    def _complete(self, cand: Candidate) -> tuple[bool, str]:
        if self.local:
            return check_complete(cand.url)
        return remote_complete(self.fs, cand)

    def _identity(self, cand: Candidate) -> str:
        if self.local:
            return checkpoint_identity(cand.url)
        h = hashlib.sha256(cand.url.encode())
        for rel, size, version in cand.snapshot:
            h.update(f"\0{rel}\0{size}\0{version}".encode())
        return h.hexdigest()[:24]

    # ------------------------------------------------------------------------------------------ fetching

    def still_there(self, cand: Candidate) -> bool:
        try:
            return self.fs.exists(cand.url if self.local else self.fs._strip_protocol(cand.url))
        except Exception:  # noqa: BLE001
            return False

    @contextmanager
    def local_copy(self, cand: Candidate, downloads: Path) -> Iterator[str]:
        """The checkpoint as a local path: itself for local dirs, else a download removed afterwards."""
        if self.local:
            yield cand.url
            return
        dest = Path(downloads) / cand.name
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s -> %s", cand.url, dest)
        try:
            src = self.fs._strip_protocol(cand.url)
            if cand.name.endswith(".gguf") and len(cand.snapshot) == 1 and cand.snapshot[0][0] == cand.name:
                self.fs.get(src, str(dest))
            else:
                dest.mkdir()
                for rel in cand.files:  # file by file: the same layout whatever the store's get() does with dirs
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    self.fs.get(f"{src}/{rel}", str(dest / rel))
            ok, reason = check_complete(dest)
            if not ok:
                raise CkptEvalError(f"downloaded copy of {cand.url} is incomplete: {reason}")
            yield str(dest)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
            if dest.exists() and dest.is_file():
                dest.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ events

    def start_events(self, wake: threading.Event):
        """Wake the loop on filesystem events (local dirs with the watchdog package); None when unavailable."""
        if not self.local:
            return None
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            log.info("filesystem events unavailable (pip install watchdog): polling every watch.interval")
            return None

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event):
                wake.set()

        observer = Observer()
        observer.schedule(_Wake(), self.root_path, recursive=True)
        observer.daemon = True
        observer.start()
        log.info("watching %s for filesystem events (and polling every watch.interval)", self.root_path)
        return observer


def remote_complete(fs, cand: Candidate) -> tuple[bool, str]:
    """Completeness from a remote listing: the markers `check_complete` looks for, without downloading."""
    names = set(cand.files)
    if cand.name.endswith(".gguf") or any(n.endswith(".gguf") for n in names):
        return True, ""
    if ".metadata" in names:
        return True, ""
    if any(n.endswith(".distcp") for n in names):
        return False, f"checkpoint {cand.url} is incomplete: no .metadata (still being written?)"
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in names:
            try:
                weight_map = json.loads(fs.cat(f"{fs._strip_protocol(cand.url)}/{index}")).get("weight_map") or {}
            except (OSError, ValueError) as exc:
                return False, f"checkpoint {cand.url} is incomplete: {index} unreadable ({exc})"
            missing = sorted(set(weight_map.values()) - names)
            if not weight_map or missing:
                return False, f"checkpoint {cand.url} is incomplete: {index} names missing shards {missing[:3]}"
            return True, ""
    if names & {"model.safetensors", "pytorch_model.bin"}:
        return True, ""
    return False, f"checkpoint {cand.url} has no weights yet ({', '.join(sorted(names)[:6])})"

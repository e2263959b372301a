"""Find the checkpoints under `watch.dir` that are ready: complete, with their architecture, and still.

One listing per look through `checkpoint.listing.list_checkpoints(DIR/*)` (the function `glob:` scans and
train_eval's resume use too; fsspec: a local dir, `file://`, `s3://`, `gs://`, ...). Every top-level entry
whose name carries a step (`step_1200`, `global_step1200`, `iter_0001200`, `step_1200.gguf`) is a candidate;
hidden entries (`.step_1200.partial` of an atomic saver, our own `.ckpteval_watch`) are not. Symlinked entries
are followed like `glob:` scans follow them; two names for one target are one checkpoint (evaluated once). A
candidate is ready when
  1. it is complete: `checkpoint.check_complete` (DCP `.metadata` and every file it names at full size, HF index
     shards all present, safetensors not truncated, GGUF parses) through `listing.entry_complete`, which runs
     the same check on remote stores reading only headers and small files;
  2. its architecture source is there: config.json in or beside an HF/DCP dir (`inspect_checkpoint`'s
     `config_dir`), or wherever its family looks (a trainer's run dir), or `ckpt_config=`; GGUF carries its own.
     There is no `model`-group fallback here: a DCP dir whose config.json has not arrived yet waits;
  3. it is stable: every file's size (and mtime/etag where the store has one) is unchanged across two looks at
     least `watch.stable_s` apart, so a trainer still writing (or a slow copy) is never picked up half-way.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ckpteval.checkpoint import check_complete, checkpoint_identity, inspect_checkpoint, parse_step
from ckpteval.checkpoint.detect import file_step
from ckpteval.checkpoint.listing import READ_RACE, Entry, entry_complete, header_mirror, list_checkpoints
from ckpteval.errors import CkptEvalError
from ckpteval.steps import is_checkpoint_file

log = logging.getLogger("ckpteval.watch")

READY, UNSTABLE, INCOMPLETE = "ready", "unstable", "incomplete"
Snapshot = tuple  # ((relative name, size, version), ...) sorted
NO_FALLBACK = "the watcher takes no architecture from the `model` group, it waits for the file"


@dataclass
class Candidate:
    name: str  # entry name under watch.dir (step_1200, model_step_1200.gguf)
    url: str  # local path (a symlink stays as named), or the fsspec URL for remote stores
    step: int | None
    snapshot: Snapshot = ()
    state: str = INCOMPLETE  # ready | unstable | incomplete
    reason: str = ""  # why incomplete/unstable
    identity: str | None = None  # set when ready
    resolved: str = ""  # symlink-free target (local) or the URL: one checkpoint however many names reach it
    entry: Entry | None = None

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
    ckpt_config: str | None = None  # `ckpt_config=`: the architecture of every checkpoint (none is waited for)
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _ignored: set[str] = field(default_factory=set)
    _aliases: dict[str, str] = field(default_factory=dict)  # second name -> first name of the same target

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

    def _listing(self) -> dict[str, Entry]:
        """{top-level entry name: Entry}; loose top-level files (a run's config.json, logs) are not checkpoints."""
        import glob as globlib

        pattern = self.url_of("").rstrip("/")
        pattern = globlib.escape(pattern) + "/*" if self.local else self.url_of("*")
        # Lightning's epoch=0-step=10.ckpt and nanoGPT's ckpt.pt are single-file checkpoints too
        return {e.name: e for e in list_checkpoints(pattern) if e.is_dir or is_checkpoint_file(e.name)}

# ------------------------------------------------------------------------------------------ looking

    def look(self) -> list[Candidate]:
        """Every candidate with its state; a snapshot unchanged for stable_s, complete and with its
        architecture source is READY."""
        now = self.clock()
        out = []
        groups = self._listing()
        first_name: dict[str, str] = {}
        for name, entry in sorted(groups.items()):
            step = parse_step(name)
            if step is None and self.local:
                step = file_step(self.url_of(name))
            if step is None:
                if name not in self._ignored:
                    self._ignored.add(name)
                    log.info("ignoring %s: no step in its name (step_N, global_stepN, iter_N)", self.url_of(name))
                continue
            if entry.resolved in first_name:  # a symlink to a checkpoint already listed: the same checkpoint
                if self._aliases.get(name) != first_name[entry.resolved]:
                    self._aliases[name] = first_name[entry.resolved]
                    log.info("ignoring %s: the same checkpoint as %s (%s)", self.url_of(name),
                             self.url_of(first_name[entry.resolved]), entry.resolved)
                continue
            first_name[entry.resolved] = name
            cand = Candidate(name=name, url=self.url_of(name), step=step, snapshot=entry.files,
                             resolved=entry.resolved, entry=entry)
            seen = self._seen.get(name)
            if seen is None or seen.snapshot != cand.snapshot:
                seen = self._seen[name] = _Seen(cand.snapshot, now)
            if seen.complete is None:  # once per snapshot: completeness cannot change while files do not
                seen.complete, seen.reason = self._ready(cand)
            if not seen.complete:
                cand.state, cand.reason = INCOMPLETE, seen.reason
                if READ_RACE in seen.reason:  # the store moved under the read: judge this snapshot again next look
                    seen.complete = None
            elif now - seen.since < self.stable_s:
                cand.state = UNSTABLE
                cand.reason = f"files changed {now - seen.since:.1f}s ago (waiting for watch.stable_s={self.stable_s:g})"
            else:
                if seen.identity is None:
                    seen.identity = self._identity(cand)
                cand.state, cand.identity = READY, seen.identity
            out.append(cand)
        for gone in set(self._seen) - set(first_name.values()):
            del self._seen[gone]
        for gone in set(self._aliases) - set(groups):
            del self._aliases[gone]
        return out

    def next_stable_in(self) -> float | None:
        """Seconds until the soonest complete-but-unstable candidate could be judged stable."""
        now = self.clock()
        waits = [s.since + self.stable_s - now for s in self._seen.values() if s.complete and s.identity is None]
        return max(0.0, min(waits)) if waits else None

    def _ready(self, cand: Candidate) -> tuple[bool, str]:
        """Complete by its format's rules, and its architecture source present (no `model`-group fallback)."""
        try:
            ok, reason = entry_complete(cand.entry)
            if not ok:
                return False, reason
            if self.ckpt_config:
                return True, ""
            if self.local:
                return _architecture(cand.url, cand.url)
            with header_mirror(cand.entry, with_parent_config=True) as mirror:
                return _architecture(mirror, cand.url)
        except FileNotFoundError as exc:  # files went away between the listing and the check
            return False, f"checkpoint {cand.url} changed while it was checked ({exc})"
        except Exception as exc:
            log.warning("checking %s failed; it waits until its files change", cand.url, exc_info=exc)
            return False, f"checking {cand.url} failed ({type(exc).__name__}: {exc})"

    def _identity(self, cand: Candidate) -> str:
        if self.local:
            return checkpoint_identity(cand.resolved)
        h = hashlib.sha256(cand.url.encode())
        for rel, size, version in cand.snapshot:
            h.update(f"\0{rel}\0{size}\0{version}".encode())
        return h.hexdigest()[:24]

    # ------------------------------------------------------------------------------------------ fetching

    def still_there(self, cand: Candidate) -> bool:
        try:
            if self.local:  # through the symlink, if it is one: a dangling link is a deleted checkpoint
                return Path(cand.url).exists()
            return self.fs.exists(self.fs._strip_protocol(cand.url))
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


def _architecture(path, shown: str) -> tuple[bool, str]:
    """(present?, what it waits for): the architecture by the family's own rules with no `model` group to fall
    back on (config.json in or beside an HF/DCP dir; GGUF and self-describing files carry their own). A config.json
    that is there but broken is not waited for: the checkpoint is complete and stable, so its evaluation runs and
    records the error (attempts, then failed) instead of waiting forever in silence."""
    try:
        info = inspect_checkpoint(path)
        info = info.base or info  # an adapter's architecture is its base's
        info.family.architecture(info.path, model_cfg=None)
    except CkptEvalError as exc:
        base = Path(str(path))
        if any((d / "config.json").is_file() for d in (base, base.parent)) or (base / "adapter_config.json").is_file():
            return True, ""  # an adapter whose base is missing fails its evaluation with the reason, not waits
        return False, (f"checkpoint {shown} is complete but its architecture is not there yet "
                       f"({str(exc).replace(str(path), shown)}): {NO_FALLBACK}")
    return True, ""

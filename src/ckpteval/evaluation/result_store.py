"""The result store: finished evaluation work kept on disk, so a killed job's next start resumes where it stopped.

    store = open_store(cfg.cache, main=dist.is_main)     # before the model loads: a read-only place fails here
    entry = store.entry(checkpoint_fingerprint(info), {"kind": "harness", "dtype": ..., ...}, main=...)
    found = entry.lookup()                               # {key: (value, seconds of work)}, rank 0 reads
    entry.add([(key, value), ...], seconds)              # one batch's results; a kill loses < cache.flush_s s
    entry.close()                                        # flushes (also on SIGTERM: the caller's `finally`)
    entry.drop()                                         # the job ended FINISHED (unless cache.keep=true)

An *entry* is everything one checkpoint gives under one set of settings (what decides a result: the checkpoint's
content fingerprint, dtype, backend, device type, model config, library versions); a *key* names one request
or window inside it (`ll:`/`roll:`/`gen:` + a hash of its tokens and generation settings, `w:<slot>:<hash of the
window's tokens>`). Nothing about the rank count, the batch size or the run dir goes into either, so a job
killed at 2 ranks resumes at 1 and the watcher's or SLURM's next attempt finds the same entry.

Layout under `cache.dir` (default `<paths.outputs>/result_store`), JSON only: reading the store executes nothing::

    <family>-<fingerprint>/meta.json                  what the entry holds (checkpoint path, settings)
    <family>-<fingerprint>/<host>-<pid>-<rand>.jsonl  one file per writer (one rank of one job), append-only

`family` hashes the checkpoint path and the settings, `fingerprint` the checkpoint's content: an entry of the
same family with another fingerprint holds results of an older checkpoint at that path and is deleted when the
new one opens. Every writer appends to a file of its own and holds an advisory lock on it while it lives, so
concurrent jobs (several machines on a shared filesystem included) never write the same file, and a reader tells
a finished or dead writer's file (lock free) from a live one's. A line is `<crc32> <json>\\n`, the JSON one
batch's results: a line cut short (SIGKILL mid-write, a full disk) or damaged fails its checksum, is reported in
one warning line, left out (its work is done again), and a dead writer's file is rewritten without it.

Bounded: entries of a job that ended FINISHED are dropped (`cache.keep=true` keeps them); when a job opens its
entry and the store holds more than `cache.max_gb`, the least recently used other entries without a live writer
are evicted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
import zlib
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ckpteval.errors import CkptEvalError

log = logging.getLogger("ckpteval")

META = "meta.json"
SAMPLE_BYTES = 4096  # per sampled block of a weight file (its start, middle and end)
_FORMAT = 1  # layout version: an entry written by another layout is rebuilt


# ---------------------------------------------------------------------------------------------- keys


def digest(obj: Any, size: int = 10) -> str:
    """A short stable hash of a JSON-able object (hex, 2*size characters)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def request_key(kind: str, *parts: Any) -> str:
    """`kind:hash` of a request's tokens and settings (kind: gen)."""
    return f"{kind}:{digest(parts)}"


def _tokens(seq) -> bytes:
    return len(seq).to_bytes(8, "little") + array("q", seq).tobytes()


def continuation_keys(kind: str, prefix, continuations) -> list[str]:
    """`kind:hash` of (prefix, continuation) token pairs (kind: ll, roll), the prefix hashed once: a few
    microseconds per request even with long few-shot prefixes."""
    base = hashlib.blake2b(kind.encode() + _tokens(prefix), digest_size=10)
    keys = []
    for cont in continuations:
        h = base.copy()
        h.update(_tokens(cont))
        keys.append(f"{kind}:{h.hexdigest()}")
    return keys


def _sampled(f: Path, size: int, h) -> None:
    """Hash a file's first, middle and last SAMPLE_BYTES (all of it when small): a rewrite that keeps the size
    and modification time (`cp -p` of another step of the same model) still changes these bytes."""
    with open(f, "rb") as fh:
        if size <= 3 * SAMPLE_BYTES:
            h.update(fh.read())
            return
        for offset in (0, size // 2 - SAMPLE_BYTES // 2, size - SAMPLE_BYTES):
            fh.seek(offset)
            h.update(fh.read(SAMPLE_BYTES))


def _remote_url(path: Path) -> str | None:
    """The URL a local copy was downloaded from (`checkpoint.remote.materialize` marks its copies with a
    `.complete` file naming it; the copy's dir name hashes the remote listing, sizes and etags)."""
    marker = path.parent / ".complete"
    with contextlib.suppress(OSError):
        if marker.is_file():
            return marker.read_text().strip() or None
    return None


def path_fingerprint(path) -> dict:
    """Resolved path and, per file, its relative name, size, modification time and sampled bytes. A remote
    checkpoint's local copy is identified by its URL and contents (its files' times are the download's)."""
    root = Path(str(path)).expanduser().resolve()
    url = _remote_url(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
    h = hashlib.blake2b(digest_size=12)
    for f in files:
        st = f.stat()
        rel = f.name if f == root else f.relative_to(root).as_posix()
        h.update(f"\0{rel}\0{st.st_size}\0{'' if url else st.st_mtime_ns}\0".encode())
        _sampled(f, st.st_size, h)
    return {"path": url or str(root), "content": h.hexdigest()}


def checkpoint_fingerprint(info) -> dict:
    """What identifies a checkpoint's weights (`CheckpointInfo`): `path_fingerprint` of its path, its format,
    and the same of the checkpoint it builds on when it has one (`info.base`: an adapter's base model, as a
    CheckpointInfo or a path), so a rewritten base invalidates the adapter's results too."""
    out = {"format": str(getattr(info, "format", "")), **path_fingerprint(info.path)}
    base = getattr(info, "base", None)
    if base is not None:
        out["base"] = checkpoint_fingerprint(base) if hasattr(base, "path") else path_fingerprint(base)
    return out


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


# ---------------------------------------------------------------------------------------------- store


def open_store(cache_cfg, main: bool = True) -> ResultStore | None:
    """The store at `cache.dir` (None when `cache.enabled=false`). Checks that it is writable, so a read-only
    place is one error before any model loads."""
    if cache_cfg is None or not cache_cfg.enabled:
        return None
    max_gb, flush_s = float(cache_cfg.max_gb), float(cache_cfg.flush_s)
    if not max_gb > 0:
        raise CkptEvalError(f"cache.max_gb={cache_cfg.max_gb} is out of range: use a positive size in GB "
                            f"(cache.max_gb=20), or turn the result store off with cache.enabled=false")
    if not flush_s >= 0:
        raise CkptEvalError(f"cache.flush_s={cache_cfg.flush_s} is out of range: use 0 or more seconds")
    root = Path(str(cache_cfg.dir)).expanduser().resolve()
    _check_writable(root)
    return ResultStore(root, int(max_gb * 1e9), flush_s)


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CkptEvalError(f"cache.dir={root} is not writable ({exc.strerror or exc}): the result store that "
                            f"lets a killed job resume lives there; point cache.dir at a writable place (a shared "
                            f"filesystem for SLURM jobs), or turn it off with cache.enabled=false") from None


class ResultStore:
    def __init__(self, root: Path, max_bytes: int, flush_s: float) -> None:
        self.root, self.max_bytes, self.flush_s = root, max_bytes, flush_s

    def entry(self, checkpoint: dict, settings: dict, main: bool = True) -> Entry:
        """The entry of `checkpoint` (a `checkpoint_fingerprint`) under `settings`. The main rank deletes the
        entries of older contents of the same checkpoint path, rebuilds a damaged one, and evicts least recently
        used entries beyond `max_bytes` (this one, just touched, last); every rank writes."""
        family = digest({"path": checkpoint.get("path"), "settings": settings}, 6)
        directory = self.root / f"{family}-{digest(checkpoint, 6)}"
        meta = json.loads(json.dumps({"format": _FORMAT, "checkpoint": checkpoint, "settings": settings},
                                     sort_keys=True, default=str))
        if main:
            for stale in self.root.glob(f"{family}-*"):
                if stale != directory:
                    log.info("result store: %s holds results of an earlier content of %s: deleted", stale,
                             checkpoint.get("path"))
                    shutil.rmtree(stale, ignore_errors=True)
            _ensure_meta(directory, meta)
            self.evict(keep=directory)
        return Entry(directory, self.flush_s)

    def evict(self, keep: Path | None = None) -> None:
        """Least recently used entries out, until the store holds at most `max_bytes` (entries a live writer
        holds, and `keep`, stay)."""
        entries = []
        for d in self.root.iterdir() if self.root.is_dir() else ():
            if not d.is_dir() or "-" not in d.name or d == keep:
                continue
            files = [f for f in d.iterdir() if f.is_file()]
            stats = [f.stat() for f in files]
            entries.append((max((s.st_mtime for s in stats), default=0.0), sum(s.st_size for s in stats), d, files))
        total = sum(size for _, size, _, _ in entries)
        for used, size, d, files in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if any(_live(f) for f in files if f.suffix == ".jsonl"):
                continue
            shutil.rmtree(d, ignore_errors=True)
            total -= size
            log.info("result store: evicted %s (%.1f MB, last used %s) to stay under cache.max_gb", d.name,
                     size / 1e6, time.strftime("%Y-%m-%d %H:%M", time.localtime(used)))


def _ensure_meta(directory: Path, meta: dict) -> None:
    """Create the entry (meta written atomically, before any result), or rebuild it when its meta is damaged or
    describes something else; touch it either way (its time is the entry's last use for eviction)."""
    path = directory / META
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = None
        if found != meta:
            log.warning("result store: %s is damaged (unreadable %s): rebuilt, its results are computed again",
                        directory, META)
            shutil.rmtree(directory, ignore_errors=True)
        else:
            os.utime(path)
            return
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".meta-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(meta, f, sort_keys=True, indent=1, default=str)
    os.chmod(tmp, 0o644)  # other users' jobs on a shared store read it
    os.replace(tmp, path)


def _live(path: Path) -> bool:
    """Whether a live writer holds `path` (its lock); a file of a finished or killed writer is free."""
    try:
        with open(path, "rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- entry


def _line(record: dict) -> bytes:
    body = json.dumps(record, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _parse(line: bytes) -> dict | None:
    """A record, or None when the line is cut short or damaged (its checksum or JSON fails)."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        record = json.loads(body)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("r"), list):
        return None
    return record


class Entry:
    """One entry: this process's writer (created on its first result) and the merged view of every writer."""

    def __init__(self, directory: Path, flush_s: float) -> None:
        self.dir, self.flush_s = directory, flush_s
        self._fd: int | None = None
        self._path: Path | None = None
        self._pending: list[bytes] = []
        self._pending_s = 0.0  # seconds of work in `_pending`
        self._last_flush = time.monotonic()
        self._broken = False  # writing failed once (disk full, dir gone): the job goes on without saving

    # -- reading ------------------------------------------------------------------------------------------
    def lookup(self) -> dict[str, tuple[Any, float]]:
        """Every stored result: {key: (value, seconds of work it took)}. Damaged lines are left out (one
        warning line) and a dead writer's file is rewritten without them."""
        found: dict[str, tuple[Any, float]] = {}
        damaged, files = 0, 0
        for path in sorted(self.dir.glob("*.jsonl")) if self.dir.is_dir() else ():
            if path == self._path:
                continue
            bad = self._read(path, found)
            damaged += bad
            files += bool(bad)
        if damaged:
            log.warning("result store: %d damaged record(s) in %d file(s) of %s (a job killed mid-write, or a full "
                        "disk): left out, the file(s) rewritten without them; that work is done again", damaged,
                        files, self.dir)
        return found

    def _read(self, path: Path, found: dict) -> int:
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below; held for the lock while it is rewritten
        except OSError:
            return 0
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                live = False
            except OSError:
                live = True
            data = fh.read()
            lines = data.split(b"\n")
            tail = lines.pop()  # b"" after a final newline; else a line cut short
            good, bad = [], 0
            for line in lines:
                record = _parse(line)
                if record is None:
                    bad += 1
                    continue
                good.append(line)
                seconds = float(record.get("s") or 0.0) / max(1, len(record["r"]))
                for key, value in record["r"]:
                    found.setdefault(key, (value, seconds))
            if tail and not live:  # a live writer may be writing that line right now
                bad += 1
            if bad and not live:
                self._rewrite(path, good)
        return bad

    @staticmethod
    def _rewrite(path: Path, good: list[bytes]) -> None:
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".rewrite-")
            with os.fdopen(fd, "wb") as f:
                f.write(b"".join(line + b"\n" for line in good))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("result store: could not rewrite %s (%s)", path, exc)

    # -- writing ------------------------------------------------------------------------------------------
    def add(self, pairs: Iterable[tuple[str, Any]], seconds: float) -> None:
        """One batch's results (key, JSON-able value) and the seconds it took. Written (and fsynced) once the
        unwritten results hold `flush_s` seconds of work or the last write is `flush_s` old, else with the next
        batch (or `close`): a kill loses less than `flush_s` seconds of finished work."""
        pairs = [[k, v] for k, v in pairs]
        if not pairs or self._broken:
            return
        self._pending.append(_line({"r": pairs, "s": round(float(seconds), 6)}))
        self._pending_s += float(seconds)
        if self._pending_s >= self.flush_s or time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if not self._pending or self._broken:
            return
        data, self._pending, self._pending_s = b"".join(self._pending), [], 0.0
        try:
            if self._fd is None:
                self._open()
            os.write(self._fd, data)
            os.fsync(self._fd)  # a node that dies keeps what the job was told is saved
        except OSError as exc:
            self._broken = True
            reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            log.warning("result store: writing to %s failed (%s): this job goes on without saving its progress",
                        self.dir, reason)
        self._last_flush = time.monotonic()

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname().split('.')[0]}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._path = self.dir / name
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # held while this writer lives (a reader may hold it for a moment)

    def close(self) -> None:
        """Write what is pending and release this writer (its file stays for the next job)."""
        self.flush()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def drop(self) -> None:
        """Delete the entry (its job ended FINISHED and nothing needs it any more)."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- jobs


def model_settings(model) -> str:
    """A hash of the model's config (its architecture, whatever file or `model` group it came from)."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    return digest(config)


def job_entry(store: ResultStore, info, settings: dict, dist) -> Entry:
    """`store.entry` for a job's checkpoint: the main rank fingerprints it and tells the other ranks (so every
    rank writes into the same entry even where file times look different from another node)."""
    fingerprint = checkpoint_fingerprint(info) if dist.is_main else None
    if dist.world_size > 1:
        import torch.distributed

        box = [fingerprint]
        torch.distributed.broadcast_object_list(box, src=0)
        fingerprint = box[0]
    return store.entry(fingerprint, {**settings, "versions": library_versions()}, main=dist.is_main)


def drop_when_finished(job, entry: Entry, keep: bool) -> None:
    """Drop `entry` once `job` ended FINISHED (its results are in MLflow and results.json), unless
    `cache.keep=true`; a job that fails or is stopped keeps it for its next attempt."""
    if keep or not job.dist.is_main:
        return

    def drop() -> None:
        try:
            entry.drop()
        except OSError as exc:  # the job is FINISHED: a leftover entry is only disk space (LRU evicts it)
            log.warning("result store: could not delete %s (%s)", entry.dir, exc)

    job.on_finished.append(drop)

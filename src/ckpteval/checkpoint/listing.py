"""The one way to list checkpoints, local or remote, and the one definition of "complete" for both.

`list_checkpoints(pattern)` expands a glob (a local path or an fsspec URL such as `s3://bucket/run/*`) into
`Entry`s: each match with every file under it (relative name, size, version). Used by the watcher (`DIR/*`),
`ckpt=glob:` scans (`sweep.expand_pattern`) and train_eval's resume (`DIR/step_*`).

Symlinks are followed everywhere (a symlinked checkpoint is a checkpoint); `Entry.resolved` is the target, so
callers can recognise the same checkpoint reached through two names. Hidden entries (`.step_N.partial` of an
atomic saver, our `.ckpteval_watch`) are never listed.

`entry_complete(entry)` runs `checkpoint.check_complete` for both kinds: on the path itself when local, and for
remote stores on a *header mirror* in a temporary dir: small files (json, DCP `.metadata`) are copied whole,
large ones become sparse files of the listed size holding only their header bytes (safetensors header, GGUF
header and tensor table), so the same shard-size, safetensors-header and GGUF checks run without downloading
weights.
"""

from __future__ import annotations

import glob as globlib
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

VERSION_KEYS = ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag", "md5Hash")
SMALL_BYTES = 1 << 20  # files up to this size are mirrored whole (configs, indexes, DCP .metadata)
GGUF_PREFIXES = (8 << 20, 64 << 20)  # GGUF header+tensor-table bytes tried before reading the whole file
FileRow = tuple  # (path relative to the entry, size, version)


@dataclass(frozen=True)
class Entry:
    name: str  # the match's base name (step_1200, model_step_1200.gguf)
    path: str  # local path as matched (a symlink stays a symlink here), or the fsspec URL
    resolved: str  # local: the symlink-free target; remote: the URL
    is_dir: bool
    files: tuple[FileRow, ...]  # sorted; a single file's only row is (name, size, version)
    local: bool = True

    @property
    def names(self) -> list[str]:
        return [rel for rel, _, _ in self.files]


def _fs(url: str):
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path, isinstance(fs, LocalFileSystem)


def _protocol(fs) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def list_checkpoints(pattern: str) -> list[Entry]:
    """Every non-hidden match of `pattern` (glob syntax, `**` allowed) with the files under it."""
    fs, path, local = _fs(pattern)
    if local:
        return [_local_entry(m) for m in sorted(set(globlib.glob(os.path.expanduser(path), recursive=True)))
                if not os.path.basename(m.rstrip("/")).startswith(".") and os.path.exists(m)]
    proto = _protocol(fs)
    head, _, tail = path.rstrip("/").rpartition("/")
    if tail == "*" and not globlib.has_magic(head):  # DIR/*: one recursive listing, not one per entry
        return _remote_children(fs, proto, head)
    out = []
    for match in sorted(fs.glob(path)):
        match = fs._strip_protocol(match).rstrip("/")
        name = match.rsplit("/", 1)[-1]
        if not name.startswith("."):
            entry = _remote_entry(fs, proto, match, name)
            if entry is not None:
                out.append(entry)
    return out


def _remote_children(fs, proto: str, root: str) -> list[Entry]:
    try:
        found = fs.find(root, withdirs=False, detail=True)
    except FileNotFoundError:
        return []
    groups: dict[str, list[FileRow]] = {}
    single: dict[str, bool] = {}
    for path, info in found.items():
        rel = fs._strip_protocol(path)[len(root.rstrip("/")) + 1:]
        top, _, inner = rel.partition("/")
        if not top or top.startswith("."):
            continue
        groups.setdefault(top, []).append((inner or top, int(info.get("size") or 0), _version(info)))
        single[top] = not inner
    return [Entry(name, f"{proto}://{root.rstrip('/')}/{name}", f"{proto}://{root.rstrip('/')}/{name}",
                  not single[name], tuple(sorted(rows)), local=False) for name, rows in sorted(groups.items())]


def _version(info: dict) -> str:
    return next((str(info[k]) for k in VERSION_KEYS if info.get(k) is not None), "")


def _local_entry(match: str) -> Entry:
    match = os.path.normpath(match)
    resolved = os.path.realpath(match)
    name = os.path.basename(match)
    if not os.path.isdir(resolved):
        st = os.stat(resolved)
        return Entry(name, match, resolved, False, ((name, st.st_size, str(st.st_mtime_ns)),))
    rows, visited = [], set()
    for dirpath, dirnames, filenames in os.walk(resolved, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop inside a checkpoint: list each real dir once
            dirnames[:] = []
            continue
        visited.add(real)
        for fname in filenames:
            full = os.path.join(dirpath, fname)
            try:
                st = os.stat(full)
            except FileNotFoundError:  # deleted while listing, or a dangling link
                continue
            rows.append((os.path.relpath(full, resolved).replace(os.sep, "/"), st.st_size, str(st.st_mtime_ns)))
    return Entry(name, match, resolved, True, tuple(sorted(rows)))


def _remote_entry(fs, proto: str, match: str, name: str) -> Entry | None:
    url = f"{proto}://{match}"
    try:
        found = fs.find(match, withdirs=False, detail=True)
    except FileNotFoundError:
        return None
    rows = []
    for path, info in found.items():
        path = fs._strip_protocol(path).rstrip("/")
        if path == match:  # the match is a file
            return Entry(name, url, url, False, ((name, int(info.get("size") or 0), _version(info)),), local=False)
        if path.startswith(match + "/"):
            rows.append((path[len(match) + 1:], int(info.get("size") or 0), _version(info)))
    return Entry(name, url, url, True, tuple(sorted(rows)), local=False)


# ---------------------------------------------------------------------------------------------- completeness


READ_RACE = "changed while it was read"  # a verdict about one read, not about the listed files: never cached


def entry_complete(entry: Entry) -> tuple[bool, str]:
    """`check_complete` for a listed entry, local or remote (the remote one reads only headers/small files)."""
    from ckpteval.checkpoint import check_complete

    if entry.local:
        return check_complete(entry.path)
    try:
        with header_mirror(entry) as mirror:
            ok, reason = check_complete(mirror)
            return ok, reason.replace(str(mirror), entry.path)
    except FileNotFoundError as exc:
        try:  # the listing was older than the store (an upload finishing): list afresh next time
            import fsspec

            fsspec.core.url_to_fs(entry.url)[0].invalidate_cache()
        except Exception:  # noqa: BLE001 - a cache that cannot be dropped only delays the next look
            pass
        return False, f"checkpoint {entry.path} {READ_RACE} ({exc}): still being written?"


@contextmanager
def header_mirror(entry: Entry, with_parent_config: bool = False) -> Iterator[Path]:
    """A temporary local stand-in for a remote entry: same names and sizes, real bytes only where checks read.
    With `with_parent_config`, a `config.json` beside the entry is mirrored too (the architecture source of
    DCP dirs saved under a run dir)."""
    fs, root, _ = _fs(entry.path)
    with tempfile.TemporaryDirectory(prefix="ckpteval_mirror_") as tmp:
        dest = Path(tmp) / entry.name
        if entry.is_dir:
            for rel, size, _ in entry.files:
                _mirror_file(fs, f"{root}/{rel}", dest / rel, size)
        else:
            _mirror_file(fs, root, dest, entry.files[0][1])
        if with_parent_config:
            parent = root.rsplit("/", 1)[0]
            if parent != root and fs.isfile(f"{parent}/config.json"):
                (Path(tmp) / "config.json").write_bytes(fs.cat_file(f"{parent}/config.json"))
        yield dest


def _mirror_file(fs, src: str, dest: Path, size: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if size <= SMALL_BYTES or dest.name == ".metadata" or dest.suffix in (".json", ".txt", ".model"):
        dest.write_bytes(fs.cat_file(src))  # descriptions (DCP metadata, configs, indexes, tokenizers): whole
        return
    head = b""
    if dest.suffix == ".safetensors":
        first = fs.cat_file(src, start=0, end=8)
        if len(first) == 8:
            (n,) = struct.unpack("<Q", first)
            head = fs.cat_file(src, start=0, end=min(size, 8 + n)) if n < size else first
    elif dest.suffix == ".gguf":
        head = fs.cat_file(src, start=0, end=min(size, GGUF_PREFIXES[0]))
    _write_sparse(dest, head, size)
    if dest.suffix == ".gguf" and not _gguf_parses(dest):
        for prefix in (*GGUF_PREFIXES[1:], size):  # a large tokenizer vocab: read further, then all of it
            _write_sparse(dest, fs.cat_file(src, start=0, end=min(size, prefix)), size)
            if prefix >= size or _gguf_parses(dest):
                break


def _write_sparse(dest: Path, head: bytes, size: int) -> None:
    with open(dest, "wb") as f:
        f.write(head)
        f.truncate(size)


def _gguf_parses(path: Path) -> bool:
    from ckpteval.checkpoint import check_complete

    return check_complete(path)[0]

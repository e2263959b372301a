"""lm-eval's task index, cached on disk: a TaskManager in a fraction of a second instead of ~15 s per process.

    manager = cached_task_manager(include_path, include_defaults=True, cache_dir=Path("outputs/harness_task_index"))

lm-eval's `TaskManager()` parses every task YAML it can find (~14k built-in files, 13-19 s on 2 cores) to learn
each name's kind, file and tags, in every process: every `mode=harness` call, every SLURM scan job, every
watcher restart. That index depends only on lm-eval's version and on those files. The first process stores it
as JSON (per entry: name, kind, file, tags) under `cache_dir`, keyed by lm-eval's version and the indexed roots;
later processes use it while a fingerprint of the YAML files under the roots and of the other files they include
is unchanged (lm-eval's own ~14k files by size and mtime, ~0.2 s; an include path's by content), so an edit, a
new or deleted file, or an lm-eval upgrade rebuilds it. An entry's parsed YAML (`cfg`) is read from its file
when something asks for it, with the loader the index uses; lm-eval's TaskFactory reads the file again anyway
when it builds a task, so tasks built from a cached index are the ones a fresh `TaskManager` builds. A corrupt
cache is rebuilt with a warning; writes go to a temp file that replaces the cache in one rename, so concurrent
jobs at worst build it twice. JSON, not pickle: reading the cache executes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 1
_IGNORE_DIRS = {"__pycache__", ".ipynb_checkpoints"}  # what lm-eval's index skips
_UNREAD = object()


def cached_task_manager(include_path: str | None, include_defaults: bool, cache_dir: Path | None):
    """A TaskManager for `include_path` (+ lm-eval's built-in tasks) whose index comes from `cache_dir` when
    the files are unchanged; else lm-eval builds it (and it is stored for the next process)."""
    from lm_eval import __version__ as version
    from lm_eval.tasks import TaskManager

    if cache_dir is None:
        return TaskManager(include_path=include_path, include_defaults=include_defaults)
    roots = _roots(include_path, include_defaults)
    path = Path(cache_dir) / f"{_key(version, roots)}.json"
    builtin = roots[0] if include_defaults else None
    index = _cached_index(path, version, roots, builtin)
    if index is not None:
        manager = _manager_with_index(index, include_path)
        if manager is not None:
            return manager
    deps = _included_files(roots[1:] if include_defaults else roots)
    fingerprint = _fingerprint(roots, deps, builtin)  # before indexing: a file edited meanwhile invalidates the cache
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    try:
        _write(path, {"format": FORMAT, "lm_eval": version, "roots": roots, "deps": deps,
                      "fingerprint": fingerprint, "entries": [_row(e) for e in manager.task_index.values()]})
    except OSError as exc:
        log.warning("could not cache lm-eval's task index in %s (%s): the next job indexes the tasks again",
                    cache_dir, exc)
    return manager


def _roots(include_path: str | None, include_defaults: bool) -> list[str]:
    """The directories (or file) TaskManager indexes, in its order: built-ins first, then the include path."""
    roots = []
    if include_defaults:
        import lm_eval.tasks

        roots.append(str(Path(lm_eval.tasks.__file__).parent))
    if include_path:
        roots.append(str(include_path))
    return roots


def _key(version: str, roots: list[str]) -> str:
    digest = hashlib.sha256(json.dumps([FORMAT, version, roots]).encode()).hexdigest()[:20]
    return f"lm_eval-{version}-{digest}"


def _yaml_files(root: Path):
    """Every file under `root` whose name ends in yaml or yml: the *.yaml files lm-eval's index reads and the
    templates they include, which lm-eval names `_default_template_yaml` (it skips __pycache__ and notebook
    checkpoints, and so does this)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _IGNORE_DIRS)
        for name in sorted(filenames):
            if name.endswith(("yaml", "yml")):
                yield os.path.join(dirpath, name)


def _file_line(path: str, content: bool) -> str:
    """What identifies a file's state: size and mtime (lm-eval's installed files), or its content's hash."""
    try:
        if content:
            with open(path, "rb") as f:
                return f"{path}\0{hashlib.sha256(f.read()).hexdigest()}\n"
        st = os.stat(path)
    except IsADirectoryError:
        return f"{path}\0dir\n"
    except OSError:
        return f"{path}\0missing\n"
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n"


def _fingerprint(roots: list[str], deps: list[str], builtin: str | None) -> str:
    """Every YAML file under the roots and the other files they include: by size and mtime under lm-eval's own
    tree (`builtin`, ~14k files, ~0.2 s), by content elsewhere (a user's include path: small, and edited)."""
    h = hashlib.sha256()
    for root in roots:
        content = root != builtin
        h.update(f"root\0{_file_line(root, content and not Path(root).is_dir())}".encode())
        if Path(root).is_dir():
            for path in _yaml_files(Path(root)):
                h.update(_file_line(path, content).encode())
    for path in deps:
        h.update(f"dep\0{_file_line(path, True)}".encode())
    return h.hexdigest()


def _included_files(roots: list[str]) -> list[str]:
    """Files that task YAMLs under `roots` include (directly or through other includes) and the fingerprint's
    walk does not cover (outside the roots, or named otherwise): their edits change the index too. Only files
    that mention `include` are parsed. Called for the include path only: lm-eval's own tasks include files of
    their own tree, named *yaml, which the walk covers."""
    from lm_eval.tasks._yaml_loader import load_yaml

    inside = [Path(r).resolve() for r in roots if Path(r).is_dir()]
    found: set[str] = set()
    todo = [Path(p) for r in roots if Path(r).is_dir() for p in _yaml_files(Path(r))]
    todo += [Path(r) for r in roots if Path(r).is_file()]
    seen: set[Path] = set()
    while todo:
        path = todo.pop().resolve()
        if path in seen:
            continue
        seen.add(path)
        covered = path.name.endswith(("yaml", "yml")) and any(path.is_relative_to(r) for r in inside)
        if not covered:
            found.add(str(path))
        try:
            if "include" not in path.read_text(errors="replace"):
                continue
            cfg = load_yaml(path, resolve_func=False, recursive=False)
        except Exception:  # noqa: BLE001, S112 - lm-eval's index skips a file it cannot read; so does this
            continue
        includes = cfg.get("include") or []
        for inc in includes if isinstance(includes, list) else [includes]:
            todo.append(path.parent / str(inc))  # an absolute include stays absolute
    return sorted(found)


def _row(entry) -> list:
    return [entry.name, entry.kind.name, str(entry.yaml_path) if entry.yaml_path is not None else None,
            sorted(entry.tags)]


def _cached_index(path: Path, version: str, roots: list[str], builtin: str | None) -> dict | None:
    """The cached index (name -> Entry) when the cache is for these files; None when absent, stale or corrupt."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("lm-eval task index cache %s is unreadable (%s): indexing the tasks again", path,
                    f"{type(exc).__name__}: {exc}"[:200])
        return None
    try:
        if data["format"] != FORMAT or data["lm_eval"] != version or data["roots"] != roots:
            return None
        if data["fingerprint"] != _fingerprint(roots, [str(d) for d in data["deps"]], builtin):
            log.info("lm-eval task files changed since %s was written: indexing them again", path.name)
            return None
        return _entries(data["entries"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        log.warning("lm-eval task index cache %s is corrupt (%s): indexing the tasks again", path,
                    f"{type(exc).__name__}: {exc}"[:200])
        return None


def _entries(rows: list) -> dict:
    from lm_eval.tasks._index import Kind

    entry_class = _cached_entry_class()
    index = {}
    for name, kind, yaml_path, tags in rows:
        if not isinstance(name, str) or not isinstance(tags, list):
            raise TypeError(f"bad entry {name!r}")
        index[name] = entry_class(name=name, kind=Kind[kind], yaml_path=Path(yaml_path) if yaml_path else None,
                                  cfg=_UNREAD, tags=set(tags))
    return index


_ENTRY_CLASS = None


def _cached_entry_class():
    """lm-eval's index Entry whose `cfg` (the file's YAML, `!function` unresolved, includes merged: what the index
    holds) is read on first use."""
    global _ENTRY_CLASS
    if _ENTRY_CLASS is None:
        from lm_eval.tasks._index import Entry
        from lm_eval.tasks._yaml_loader import load_yaml

        class CachedEntry(Entry):
            @property
            def cfg(self):
                if self._cfg is _UNREAD:
                    self._cfg = (load_yaml(self.yaml_path, resolve_func=False, recursive=True)
                                 if self.yaml_path is not None else None)
                return self._cfg

            @cfg.setter
            def cfg(self, value):
                self._cfg = value

        _ENTRY_CLASS = CachedEntry
    return _ENTRY_CLASS


def _manager_with_index(index: dict, include_path: str | None):
    """A TaskManager holding `index`: built with nothing to index, then given the index and the name lists its
    constructor derives from one. None if this lm-eval keeps its index elsewhere (then it is built normally)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    manager = TaskManager(include_path=None, include_defaults=False)
    wanted = ("_index", "_all_tasks", "_all_subtasks", "_all_groups", "_all_tags")
    if not all(hasattr(manager, a) for a in wanted):
        log.info("this lm-eval's TaskManager keeps its index elsewhere: not using the cached index")
        return None
    manager.include_path = include_path
    manager._index = index
    manager._all_tasks = sorted(index)
    manager._all_subtasks = sorted(n for n, e in index.items() if e.kind in (Kind.TASK, Kind.PY_TASK))
    manager._all_groups = sorted(n for n, e in index.items() if e.kind == Kind.GROUP)
    manager._all_tags = sorted(n for n, e in index.items() if e.kind == Kind.TAG)
    return manager


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)  # readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

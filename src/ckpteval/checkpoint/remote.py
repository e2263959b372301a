"""Checkpoints in object stores (`s3://`, `gs://`, any fsspec URL): a local copy of just what evaluation reads.

`materialize(url)` lists the checkpoint (and the parent dir's loose config/tokenizer files, which a run dir of
step_N DCP dirs keeps beside them), downloads the model tensors, configs and tokenizer files (never separate
optimizer/scheduler/RNG files) into a cache dir keyed by the listing (names, sizes, etags), and returns the
local path. An unchanged listing reuses the copy; a rewritten checkpoint gets a new key. Copies are deleted
when the job ends (`cleanup()`, called by the app and at exit) unless CKPTEVAL_KEEP_DOWNLOADS=1.

Credentials and endpoints come only from the environment the store's fsspec driver reads (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, FSSPEC_S3_* ...), never from our config, so they never
reach MLflow params or logs. Settings (environment, since every mode and rank resolves the checkpoint the same
way before any config block is read):
    CKPTEVAL_REMOTE_CACHE   where copies go (default ~/.cache/ckpteval/remote)
    CKPTEVAL_KEEP_DOWNLOADS 1 keeps copies after the job (a later job on the unchanged checkpoint reuses them)
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

from ckpteval.errors import CkptEvalError

log = logging.getLogger("ckpteval.remote")

# Loose files of the parent dir that `detect` looks for beside step_N dirs.
PARENT_FILES = re.compile(r"^(config\.json|generation_config\.json|tokenizer[^/]*|vocab\.json|merges\.txt|"
                          r"special_tokens_map\.json|added_tokens\.json)$")
# Files a trainer saves beside the model that evaluation never reads (optimizer state is often bigger than the
# model); inside DCP .distcp files optimizer state cannot be separated and is downloaded with the model.
SKIP = re.compile(r"(^|/)(optim[^/]*|optimizer[^/]*|scheduler[^/]*|rng_state[^/]*|training_args\.bin|"
                  r"global_step\d+/[^/]*optim_states[^/]*)$|(^|/)(optim|optimizer|optimizer_state)/", re.IGNORECASE)
VERSION_KEYS = ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated")

_made: list[Path] = []


def is_remote(path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def cache_root() -> Path:
    return Path(os.environ.get("CKPTEVAL_REMOTE_CACHE", "~/.cache/ckpteval/remote")).expanduser()


def keep_downloads() -> bool:
    return os.environ.get("CKPTEVAL_KEEP_DOWNLOADS", "").lower() in ("1", "true", "yes")


def _version(info: dict) -> str:
    return next((str(info[k]) for k in VERSION_KEYS if info.get(k) is not None), "")


def listing(url: str) -> tuple[object, str, list[tuple[str, str, int, str]]]:
    """(fs, path, [(remote path, local relative path, size, version)]) of what evaluation needs."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise CkptEvalError(f"checkpoint {url}: no filesystem for this URL ({exc}): install its fsspec driver "
                            f"(pip install 'ckpteval[s3]' for s3://)") from exc
    path = path.rstrip("/")
    name = path.rsplit("/", 1)[-1]
    try:
        found = fs.find(path, withdirs=False, detail=True)
        parent = fs.ls(path.rsplit("/", 1)[0], detail=True) if "/" in path else []
    except (FileNotFoundError, PermissionError, OSError) as exc:
        raise CkptEvalError(f"checkpoint {url} cannot be listed ({type(exc).__name__}: {exc}): check the URL and "
                            f"the store's credentials (AWS_* environment variables for s3://)") from exc
    files = []
    for p, info in sorted(found.items()):
        rel = name if p.rstrip("/") == path else f"{name}/{p[len(path) + 1:]}"
        if not SKIP.search(rel.partition("/")[2] or rel):
            files.append((p, rel, int(info.get("size") or 0), _version(info)))
    if not files:
        raise CkptEvalError(f"checkpoint {url} does not exist (nothing listed under it): check the URL")
    for info in parent:
        base = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") == "file" and PARENT_FILES.match(base):
            files.append((info["name"], base, int(info.get("size") or 0), _version(info)))
    return fs, path, files


def materialize(url: str) -> str:
    """The local path of `url`'s copy in the cache (downloaded now unless an identical copy is there)."""
    fs, path, files = listing(url)
    h = hashlib.sha256(url.encode())
    for _, rel, size, version in files:
        h.update(f"\0{rel}\0{size}\0{version}".encode())
    key_dir = cache_root() / h.hexdigest()[:24]
    local = key_dir / path.rsplit("/", 1)[-1]
    key_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{key_dir}.lock", "w") as lock:  # ranks of one job (and jobs on one node) download once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (key_dir / ".complete").is_file():
            _download(fs, url, files, key_dir)
        else:
            log.info("reusing the copy of %s in %s", url, key_dir)
    _register(key_dir)
    return str(local)


def _download(fs, url: str, files, key_dir: Path) -> None:
    tmp = key_dir.with_name(key_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    total = sum(size for _, _, size, _ in files)
    log.info("downloading %s (%d files, %.1f MB) -> %s", url, len(files), total / 1e6, key_dir)
    for remote, rel, _, _ in files:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(tmp / rel))  # file by file: the same layout whatever get() does with dirs
    (tmp / ".complete").write_text(url + "\n")
    shutil.rmtree(key_dir, ignore_errors=True)
    os.replace(tmp, key_dir)


def _register(key_dir: Path) -> None:
    if not _made:
        atexit.register(cleanup)
    if key_dir not in _made:
        _made.append(key_dir)


def cleanup() -> None:
    """Delete this process's downloads (the job is over), unless CKPTEVAL_KEEP_DOWNLOADS=1."""
    if keep_downloads():
        _made.clear()
        return
    while _made:
        key_dir = _made.pop()
        shutil.rmtree(key_dir, ignore_errors=True)
        Path(f"{key_dir}.lock").unlink(missing_ok=True)


"""Work that does not depend on the weights, done once per scan: tokenization and lm-eval's built requests.

A `-m` scan or the watcher evaluates many checkpoints of one run with the same tasks and tokenizer. lm-eval
rebuilds every task's requests (documents, few-shot contexts, prompts) for each `simple_evaluate`, and the
backend tokenizes them again. Here:

- `token_memo(tokenizer)`: a per-process dict of encodings keyed by the tokenizer's fingerprint, so every FastLM
  on an identical tokenizer reuses them.
- `reuse_built_requests(...)`: while `simple_evaluate` runs, each task's `build_all_requests` is served from a
  cache keyed by the task's config, the build arguments, lm-eval's version and the tokenizer fingerprint: in
  memory for the process, and as JSON under `harness.request_cache_dir` for later processes. Only requests
  (prompts, documents, arguments) are cached, never responses: lm-eval's response cache does not key on the
  model, so it is never shared across checkpoints. JSON, not pickle: reading the cache executes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import tempfile
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

_MEMO_LIMIT = 2_000_000  # encodings kept per tokenizer before the memo starts over
_memos: dict[str, dict] = {}
_fingerprints: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_built: dict[str, list[dict]] = {}  # request cache key -> serialized instances
stats = {"built": 0, "reused_memory": 0, "reused_disk": 0}  # task builds done / served (what tests and logs read)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides encodings: the tokenizer's class, full serialized state and special tokens."""
    try:
        return _fingerprints[tokenizer]
    except (KeyError, TypeError):
        pass
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "add_bos_token", None)).encode())
    fp = h.hexdigest()[:32]
    with contextlib.suppress(TypeError):
        _fingerprints[tokenizer] = fp
    return fp


def token_memo(tokenizer) -> dict:
    memo = _memos.setdefault(tokenizer_fingerprint(tokenizer), {})
    if len(memo) > _MEMO_LIMIT:
        memo.clear()
    return memo


def _stable(obj) -> str:
    """JSON default for config values: functions by qualified name (their repr holds a memory address)."""
    name = getattr(obj, "__qualname__", None)
    if name is not None:
        return f"{getattr(obj, '__module__', '')}.{name}"
    return type(obj).__name__


def _docs_hash(task) -> str:
    """The documents a build reads: the evaluation split and the few-shot source, as JSON."""
    h = hashlib.sha256()
    for get in (lambda: task.eval_docs, task.fewshot_docs):
        try:
            docs = get()
        except Exception:  # noqa: BLE001 - a task without a few-shot source
            docs = None
        for doc in docs or ():
            h.update(json.dumps(doc, sort_keys=True, default=_stable).encode())
        h.update(b"|")
    return h.hexdigest()


def _key(task, kwargs: dict, base: dict) -> str | None:
    if kwargs.get("chat_template") is not None:
        return None  # a chat template is the model's code: nothing stable to key on
    try:
        desc = {"base": base, "config": task.dump_config(), "docs": _docs_hash(task),
                "build": {k: v for k, v in kwargs.items() if k not in ("chat_template", "cache_requests",
                                                                         "rewrite_requests_cache")}}
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=_stable).encode()).hexdigest()[:40]
    except Exception as exc:  # noqa: BLE001 - an unhashable config only costs the reuse
        log.info("request cache: task %s not cacheable (%s)", getattr(task, "task_name", task), exc)
        return None


def _serialize(instances) -> list[dict] | None:
    rows = [{"request_type": i.request_type, "doc": i.doc, "arguments": list(i.arguments), "idx": i.idx,
             "metadata": list(i.metadata)} for i in instances]
    try:
        json.dumps(rows)
    except (TypeError, ValueError):
        return None
    return rows


def _instances(rows: list[dict]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(r["request_type"], copy.deepcopy(r["doc"]), tuple(copy.deepcopy(r["arguments"])), r["idx"],
                     tuple(r["metadata"])) for r in rows]


def _read(path: Path) -> list[dict] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))["instances"]
    except (OSError, ValueError, KeyError):
        return None


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"instances": rows}, f)
    os.replace(tmp, path)  # readers see the whole file or none


@contextlib.contextmanager
def reuse_built_requests(tasks: dict, base: dict, cache_dir: Path | None):
    """Serve each task's `build_all_requests` from the request cache while the block runs (see module doc).

    `base`: what else decides the requests (lm-eval version, tokenizer fingerprint, seeds, our settings)."""
    patched = []
    for task in tasks.values():
        original = task.build_all_requests

        def build(*, _task=task, _original=original, **kwargs):
            key = _key(_task, kwargs, base)
            rows = _built.get(key) if key else None
            if rows is not None:
                stats["reused_memory"] += 1
            elif key and cache_dir is not None and (rows := _read(cache_dir / f"{key}.json")) is not None:
                stats["reused_disk"] += 1
                _built[key] = rows
            if rows is not None:
                _task._instances = _instances(rows)
                return None
            stats["built"] += 1
            _original(**kwargs)
            rows = _serialize(_task.instances) if key else None
            if rows is not None:
                _built[key] = rows
                if cache_dir is not None:
                    _write(cache_dir / f"{key}.json", rows)
            return None

        task.build_all_requests = build
        patched.append(task)
    try:
        yield
    finally:
        for task in patched:
            del task.build_all_requests

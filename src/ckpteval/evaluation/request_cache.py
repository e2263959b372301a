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

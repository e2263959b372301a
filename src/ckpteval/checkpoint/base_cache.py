"""One loaded base model per process, shared by the adapter checkpoints evaluated one after another in it.

    model, previous = take(key, build)   # the held base with the previous adapter undone (previous: that undo, for
                                         # the family to reuse what it kept), or build() and None when none matches
    hold(model, undo)                    # the adapter now merged into it: undone by the next take (or release)

A `-m` scan (every job runs in one process) or a watcher over the `checkpoint-*` adapter dirs of one base loads
and lays out that base once: each adapter is merged into it, evaluated, and undone exactly (the family's undo
restores the base's own tensors, nothing is recomputed) before the next one is applied, so every checkpoint gets
the same numbers as a fresh load. `load.load_model(shared_base=True)` is the only caller: the key is the base
checkpoint's `checkpoint_identity` (its files: a rewritten base loads afresh), dtype, device and the adapted
architecture. Callers that change the model they get (convert rounds it; fsdp/tp/pp lay it out) load their own.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

log = logging.getLogger("ckpteval.checkpoint")


@dataclass
class _Held:
    key: tuple
    model: nn.Module
    undo: Callable[[], None] | None = None


_held: _Held | None = None
loads = 0  # bases built by this process (tests and benchmarks read it)


def take(key: tuple, build: Callable[[], nn.Module], name: str = "the base model") -> tuple[nn.Module, object]:
    """(the base for `key`, pristine; the undo just run on it, or None): the held one with its adapter undone,
    else a new one from `build()` (the held one, if any, is dropped first, so at most one base is in memory). The
    family gets its own undo back: what it kept there (PEFT: its injected layers) may serve the next adapter."""
    global _held, loads
    if _held is not None and _held.key == key:
        undo, _held.undo = _held.undo, None
        try:
            if undo is not None:
                undo()
        except BaseException:
            release()
            raise
        log.info("base model %s: reusing the one loaded in this process", name)
        return _held.model, undo
    release()
    model = build()
    loads += 1
    _held = _Held(key, model)
    log.info("base model %s: loaded once for this process (later adapters of it reuse it)", name)
    return model, None


def hold(model: nn.Module, undo: Callable[[], None]) -> None:
    """Record the undo of the adapter just merged into the held base (the next `take` runs it)."""
    if _held is not None and _held.model is model:
        _held.undo = undo


def release(collect: bool = True) -> None:
    """Drop the held base (its memory is freed once the caller's references go; `collect` runs the garbage
    collector for what PEFT's wrappers left in reference cycles, before the next model is built)."""
    global _held
    if _held is not None:
        _held = None
        if collect:
            gc.collect()

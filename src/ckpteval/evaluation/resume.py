"""Resuming a killed evaluation from the result store (`result_store`): only the missing work runs, and it runs
exactly as in an uninterrupted job, so the metrics are the same bits.

    python run.py mode=harness ckpt=PATH ...    # killed (SIGTERM, SIGKILL, preemption) at 60%
    python run.py mode=harness ckpt=PATH ...    # the same command: "resumed 120 of 200 requests (...) from ..."

The unit of work is a batch planned from the whole request list (or the whole window order), never from what
is left: a batch is taken from the store when every result in it is there, else it runs whole, with the same
rows, padding and shared prefix it has in an uninterrupted job. Float results depend on a batch's composition,
not on which rank runs it or when, so a resumed job (with any rank count) repeats the uninterrupted numbers.

- harness (FastLM): a batch of loglikelihood / rolling requests; for greedy generation a *segment* of
  `GEN_SEGMENT_BATCHES` consecutive batches, decoded as one continuous batch (its rows share decode steps);
- loss: block k of the window order (the batch of B windows that rank r runs as its batch s, k = s*W + r);
  the job's sums are added per window with exact rounding (`loss.windows_result`).

The rank that reads the store (rank 0) decides what is done and sends it to the others; ranks then split the
remaining batches between them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ckpteval.data.windows import block_window_ids, num_eval_blocks
from ckpteval.evaluation.loss import EvalResult, score_batches, windows_result

log = logging.getLogger("ckpteval")

GEN_SEGMENT_BATCHES = 8  # generation: batches per continuously batched segment (the unit a resumed job reruns)


def stored_units(entry, n_units: int, keys_of: Callable[[int], list[str]], *, main: bool, world: int = 1,
                 group=None) -> tuple[dict[int, list], float]:
    """({unit: its values in `keys_of(unit)` order} for the units whose every key the store holds, seconds of work
    they took). The main rank reads the store and broadcasts the answer over `group` (`world` ranks)."""
    payload: tuple[dict[int, list], float] = ({}, 0.0)
    if main and entry is not None:
        found = entry.lookup()
        if found:
            done, saved = {}, 0.0
            for u in range(n_units):
                keys = keys_of(u)
                hits = [found.get(k) for k in keys]
                if keys and all(h is not None for h in hits):
                    done[u] = [h[0] for h in hits]
                    saved += sum(h[1] for h in hits)
            payload = (done, saved)
    if world > 1:
        box = [payload]
        torch.distributed.broadcast_object_list(box, group=group, group_src=0)
        payload = box[0]
    return payload


def report(what: str, reused: int, total: int, noun: str, seconds: float, entry) -> None:
    """The line a resumed job prints: `resumed N of M requests (K s of work saved) from STORE`."""
    if reused:
        log.info("%s: resumed %d of %d %s (%.1f s of work saved) from %s", what, reused, total, noun, seconds,
                 entry.dir)


# ---------------------------------------------------------------------------------------------- loss


def window_key(slot: int, window: np.ndarray) -> str:
    """`w:<position in the window order>:<hash of the window's tokens>`: the data's fingerprint is in every key,
    so changed data (or another seq_len) never reuses a result."""
    return f"w:{slot}:{hashlib.blake2b(np.ascontiguousarray(window, dtype=np.int64).tobytes(), digest_size=8).hexdigest()}"


def evaluate_windows(scorer, windows, entry, *, batch_size: int, steps: int, dist, device, dtype, model_dtype,
                     table, equal_batches: bool, writer: bool = True, progress: bool = False,
                     keep_windows: bool = False, what: str = "eval") -> EvalResult:
    """`run_eval` over the window order with the result store: blocks the store holds are read, the others run
    (split over the data-parallel ranks; `equal_batches`: every rank runs as many batches, padding batches
    added, for layouts whose forward is collective), each recorded as it finishes (`writer`: this rank records
    its blocks: one rank per tensor/pipeline group). Same numbers as an uninterrupted job, bit for bit."""
    n = len(windows)
    blocks = num_eval_blocks(n, batch_size, steps, dist.dp_size)
    ids = [block_window_ids(k, n, batch_size, steps) for k in range(blocks)]

    def keys(k: int) -> list[str]:
        return [window_key(k * batch_size + j, windows[i]) for j, i in enumerate(ids[k]) if i >= 0]

    done, saved = stored_units(entry, blocks, keys, main=dist.is_main, world=dist.world_size)
    todo = [k for k in range(blocks) if k not in done]
    mine: list[int | None] = todo[dist.dp_rank::dist.dp_size]
    if equal_batches:
        mine += [None] * (-(-len(todo) // dist.dp_size) - len(mine))
    if dist.is_main:
        report(what, sum(len(v) for v in done.values()), sum(1 for row in ids for i in row if i >= 0), "windows",
               saved, entry)

    computed: dict[int, list[float]] = {}

    def record(index: int, sums: torch.Tensor, start: float) -> None:
        k = mine[index]
        if k is None:
            return
        rows = sums.tolist()
        pairs = []
        for (j, i), key in zip([(j, i) for j, i in enumerate(ids[k]) if i >= 0], keys(k)):
            computed[k * batch_size + j] = rows[j]
            pairs.append((key, rows[j]))
        if writer and entry is not None:
            entry.add(pairs, time.perf_counter() - start)

    batches = (windows.rows(ids[k] if k is not None else [-1] * batch_size) for k in mine)
    score_batches(scorer, batches, device=device, dtype=dtype, model_dtype=model_dtype,
                  table=table.to(device) if table is not None else None, progress=progress, total=len(mine),
                  on_batch=record)
    if dist.world_size > 1:
        parts: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(parts, computed)
        for part in parts:
            computed.update(part)
    for k, values in done.items():
        slots = [k * batch_size + j for j, i in enumerate(ids[k]) if i >= 0]
        computed.update(zip(slots, values))
    rows = np.array([computed[s] for s in sorted(computed)], dtype=np.float64).reshape(-1, 4)
    return windows_result(rows, table is not None, keep_windows)

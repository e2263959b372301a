"""Token windows and the deterministic batch orders built on them.

A `TokenWindows` is a list of 1-D token arrays (memory-mapped shards, or one tokenized HF stream). Window k of
an array covers tokens [k*L, k*L+L]: inputs are the first L, targets the last L; no window spans two arrays; a
tail shorter than L+1 is dropped.

Evaluation order (contract): batch s of data-parallel rank r holds global windows (s*B*W + r*B + j) mod N for
j < B. With `steps > 0` that wraps around; with `steps = -1` indices >= N become padding rows (targets -100)
so every window is evaluated exactly once across ranks and every batch keeps the same shape (pipelining needs
that), and padding costs nothing in the loss (ignored positions are dropped before the vocabulary projection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ckpteval.errors import CkptEvalError

IGNORE = -100


@dataclass
class TokenWindows:
    arrays: list[np.ndarray]
    seq_len: int
    names: list[str] = field(default_factory=list)  # where each array came from (for error messages)

    def __post_init__(self) -> None:
        self.counts = [max(0, (len(a) - 1) // self.seq_len) for a in self.arrays]
        self.offsets = np.cumsum([0] + self.counts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        """Window i as L+1 int64 tokens."""
        a = int(np.searchsorted(self.offsets, i, side="right") - 1)
        k = i - int(self.offsets[a])
        start = k * self.seq_len
        return np.asarray(self.arrays[a][start:start + self.seq_len + 1], dtype=np.int64)

    def rows(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) for window ids; -1 = a padding row (inputs 0, targets ignored)."""
        out = np.zeros((len(ids), self.seq_len + 1), dtype=np.int64)
        pad = np.zeros(len(ids), dtype=bool)
        for row, i in enumerate(ids):
            if i < 0:
                pad[row] = True
            else:
                out[row] = self[i]
        t = torch.from_numpy(out)
        inputs, targets = t[:, :-1].clone(), t[:, 1:].clone()
        targets[torch.from_numpy(pad)] = IGNORE
        return inputs, targets


def num_eval_batches(n_windows: int, batch_size: int, steps: int, world: int = 1) -> int:
    """Batches each rank runs: `steps`, or for steps=-1 enough for one pass over all windows across ranks."""
    if steps == -1:
        return math.ceil(n_windows / (batch_size * world))
    if steps <= 0:
        raise CkptEvalError(f"eval.steps={steps} is invalid: use a positive number of batches or -1 for one pass")
    return steps


def eval_batches(windows: TokenWindows, batch_size: int, steps: int, rank: int = 0, world: int = 1
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's evaluation batches in the contract's global order (see module docstring)."""
    n = len(windows)
    if n == 0:
        raise CkptEvalError(f"the held-out data has no window of {windows.seq_len + 1} tokens: use a smaller "
                            "eval.seq_len or more data")
    for s in range(num_eval_batches(n, batch_size, steps, world)):
        yield windows.rows(block_window_ids(s * world + rank, n, batch_size, steps))


def block_window_ids(block: int, n_windows: int, batch_size: int, steps: int) -> list[int]:
    """The windows of block k of the global order (positions k*B .. k*B+B-1; batch s of rank r is block s*W+r):
    wrapped around with `steps > 0`, -1 (a padding row) past the last window with `steps = -1`. A block holds
    the same windows in the same rows whatever the rank count, so its numbers do too."""
    ids = range(block * batch_size, block * batch_size + batch_size)
    return [i if i < n_windows else -1 for i in ids] if steps == -1 else [i % n_windows for i in ids]


def num_eval_blocks(n_windows: int, batch_size: int, steps: int, world: int = 1) -> int:
    """Blocks of the global order an evaluation covers: `steps` batches per rank, or one pass (no block of
    padding only)."""
    if steps == -1:
        return math.ceil(n_windows / batch_size)
    return num_eval_batches(n_windows, batch_size, steps, world) * world


def train_batches(windows: TokenWindows, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled training batches. Global sample position p reads window perm_e[p mod N] of epoch
    e = p // N (a fresh seeded permutation per epoch); rank r of W takes positions base + r*B + j. Resuming at
    `start` (the saved data position) continues the exact same stream."""
    n = len(windows)
    if n == 0:
        raise CkptEvalError(f"the training data has no window of {windows.seq_len + 1} tokens: use a smaller "
                            "train.seq_len or more data")
    perms: dict[int, np.ndarray] = {}

    def window_at(p: int) -> int:
        epoch = p // n
        if epoch not in perms:
            perms.clear()
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        return int(perms[epoch][p % n])

    pos = start
    while True:
        base = pos + rank * batch_size
        yield windows.rows([window_at(base + j) for j in range(batch_size)])
        pos += batch_size * world


def check_token_ids(windows: TokenWindows, vocab_size: int) -> None:
    """Token ids must index the model's embedding: a larger id means data from a different tokenizer."""
    for a, name in zip(windows.arrays, windows.names or [f"array {i}" for i in range(len(windows.arrays))]):
        if len(a) == 0:
            continue
        hi, lo = int(a.max()), int(a.min())
        if hi >= vocab_size or lo < 0:
            bad = hi if hi >= vocab_size else lo
            raise CkptEvalError(f"token id {bad} in {name} is outside the model's vocabulary (vocab_size="
                                f"{vocab_size}): the data was tokenized with a different tokenizer, or data.dtype "
                                f"is wrong for .bin files")

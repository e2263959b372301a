"""Shared token prefixes across requests: which to compute once (a radix-tree plan), and a bounded KV store.

Few-shot tasks give many documents the same leading tokens (MMLU's per-subject dev examples, a `first_n` or
fixed fewshot split). `plan_shared_prefixes` sorts the token sequences, reads the radix tree off the longest
common prefixes of neighbours (the tree's internal nodes are the minima of that array), and picks the set of
disjoint subtrees whose shared prefix saves the most tokens: `(members - 1) * shared_len` for a node, less a
fixed charge per separate prefix, or the sum of its children's best when sharing deeper pays more. Every member keeps at least one token of its own, so the
logits that score it come from its own forward.

`PrefixStore` keeps the per-layer keys/values of computed prefixes under a token cap, evicting the least recently
used; a prefix that was evicted is recomputed when needed again (the numbers do not change). `expanded_cache`
hands a stored prefix to a batch as a transformers ``DynamicCache`` whose tensors are expanded views, not
copies: attention concatenates them with the batch's own keys once per layer.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

MIN_SHARED = 16  # shorter shared prefixes are not worth a separate forward and a cache
CLUSTER_COST = 64  # tokens a separate prefix is charged (its own forward, smaller batches): no needless splits


def _lcp(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_shared_prefixes(seqs: list[tuple[int, ...]], max_tokens: int, min_shared: int = MIN_SHARED
                         ) -> list[tuple[int, list[int]]]:
    """Partition sequence indices into (shared_len, members) clusters; shared_len 0 = nothing shared.

    A cluster with shared_len > 0 has >= 2 members whose first shared_len tokens are equal, shared_len is
    shorter than each member and at most `max_tokens` (the prefix cache cap).
    """
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    lcp = [_lcp(seqs[order[k]], seqs[order[k + 1]]) for k in range(len(order) - 1)]
    clusters: list[tuple[int, list[int]]] = []
    loose: list[int] = []
    # iterative tree walk over [a, b] intervals of `order`: (a, b, phase, saved-best-of-children)
    best: dict[tuple[int, int], tuple[int, list]] = {}
    stack = [(0, len(order) - 1, False)]
    while stack:
        a, b, done = stack.pop()
        if a >= b:
            best[(a, b)] = (0, [(0, [order[a]])] if a == b else [])
            continue
        m = min(lcp[a:b])
        cuts = [a] + [k + 1 for k in range(a, b) if lcp[k] == m] + [b + 1]
        children = [(cuts[j], cuts[j + 1] - 1) for j in range(len(cuts) - 1)]
        if len(children) == 1:  # cannot happen (a cut at the minimum always splits), kept for safety
            children = [(a, a), (a + 1, b)]
        if not done:
            stack.append((a, b, True))
            stack += [(c0, c1, False) for c0, c1 in children]
            continue
        kids_gain = sum(best[c][0] for c in children)
        kids_plan = [p for c in children for p in best.pop(c)[1]]
        shared = min(m, min(len(seqs[order[k]]) for k in range(a, b + 1)) - 1)
        own_gain = (b - a) * shared - CLUSTER_COST if min_shared <= shared <= max_tokens else 0
        if own_gain > kids_gain:
            best[(a, b)] = (own_gain, [(shared, [order[k] for k in range(a, b + 1)])])
        else:
            best[(a, b)] = (kids_gain, kids_plan)
    for shared, members in best[(0, len(order) - 1)][1] if order else []:
        if shared:
            clusters.append((shared, members))
        else:
            loose += members
    if loose:
        clusters.append((0, sorted(loose)))
    return clusters


@dataclass
class PrefixStore:
    """Per-layer (key, value) tensors of computed prefixes, at most `max_tokens` prefix tokens, LRU eviction."""

    max_tokens: int
    entries: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    tokens: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def get(self, prefix: tuple[int, ...], compute) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix's KV, computed with `compute(prefix)` on a miss; evicts old entries to stay under the cap."""
        kv = self.entries.get(prefix)
        if kv is not None:
            self.hits += 1
            self.entries.move_to_end(prefix)
            return kv
        self.misses += 1
        kv = compute(prefix)
        while self.entries and self.tokens + len(prefix) > self.max_tokens:
            old, _ = self.entries.popitem(last=False)
            self.tokens -= len(old)
            self.evictions += 1
        if len(prefix) <= self.max_tokens:
            self.entries[prefix] = kv
            self.tokens += len(prefix)
        return kv

    def clear(self) -> None:
        self.entries.clear()
        self.tokens = 0


def expanded_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int):
    """A DynamicCache holding the prefix for `batch` rows as expanded views of the stored [1, H, P, D] tensors."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = []
    for k, v in kv:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys = k.expand(batch, -1, -1, -1)
        layer.values = v.expand(batch, -1, -1, -1)
        layers.append(layer)
    cache = DynamicCache()
    cache.layers = layers
    return cache


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a filled DynamicCache."""
    return [(layer.keys, layer.values) for layer in cache.layers]

"""Greedy `generate_until` on FastLM's engine, giving HFLM's text.

HFLM (lm-eval 0.4) groups requests by their gen_kwargs, sorts each group by prompt length, batch-encodes each
batch of `batch_size` prompts (left padding; no added special tokens for the whole batch when its FIRST prompt
starts with the BOS string), keeps the last `max_length - max_gen_toks` tokens, and calls `model.generate` for
`max_gen_toks` new tokens with stopping criteria that end the batch once every row shows one stop string; each
row's tokens are decoded (special tokens skipped) and cut before the first stop string (the EOS text is one).
A row ends earlier only on the generation config's EOS token.

Here each row stops on its own: at EOS, at `max_gen_toks`, or once HFLM's cut of its decoded text can no longer
change (`settled`). The cut text is the same as HFLM's, because greedy tokens of a row do not depend on the rows
beside it. One case is left: HFLM's cut depends on its batch when the batch stops early (every row shows one
stop string) and a row would later generate a stop string listed before that one, starting inside that hit
(stop strings that overlap, e.g. " a " and " b " in "a b a"); this row then gets the cut of its longer text. Decoding is continuously batched over at
most `batch_size` rows (HFLM's batch size)::

    prefill   prompts of one shared prefix, right-padded, on top of that prefix's cached KV (`prefix_cache`)
    slots     each row's KV copied into a preallocated slot, columns 0..len-1; rows of any prefix side by side
    step      every row feeds its last token at its own position, written in place at its own column;
              a per-row mask hides the columns past its length
    retire    a finished row leaves, the last row moves into its slot; when half the slots are free, waiting
              prompts are prefilled into them

so decode steps run full batches whatever the prefix and wherever rows stop, and no step copies the cache.
Sampling (do_sample / temperature > 0), beam search and logits processors from the request or the model's
generation config go to HFLM instead, with a log line.
"""

from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass, field

import torch
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from transformers.cache_utils import DynamicLayer

from ckpteval.errors import CkptEvalError

log = logging.getLogger(__name__)

_GREEDY_IGNORED = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}  # no effect when greedy
_CONFIG_DEFAULTS = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0,
                    "min_new_tokens": None, "bad_words_ids": None, "suppress_tokens": None,
                    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                    "sequence_bias": None, "encoder_repetition_penalty": 1.0, "max_length": None}
HFLM_MAX_GEN_TOKS = 256  # HFLM.max_gen_toks


def not_greedy_reason(kwargs: dict, model) -> str | None:
    """Why these (normalized) gen kwargs or the model's generation config are not plain greedy decoding."""
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
        return f"sampling (do_sample={kwargs.get('do_sample')}, temperature={kwargs.get('temperature')})"
    extra = sorted(set(kwargs) - _GREEDY_IGNORED)
    if extra:
        return f"generation kwargs {', '.join(extra)}"
    config = getattr(model, "generation_config", None)
    for name, default in _CONFIG_DEFAULTS.items():
        value = getattr(config, name, default)
        if name != "max_length" and value not in (default, None):
            return f"the model's generation_config.{name}={value!r}"
    return None


def hflm_special_flags(lm, contexts: list[str], idxs: list[int]) -> dict[int, bool]:
    """Per request: whether HFLM encodes its batch with add_special_tokens=False (its batch's first prompt starts
    with the BOS string). HFLM's batches: sorted by (-tokens, text), `batch_size` at a time."""
    bos = getattr(lm.tokenizer, "bos_token", None)
    order = sorted(idxs, key=lambda i: (-len(lm.tok_encode(contexts[i])), contexts[i]))
    flags = {}
    for start in range(0, len(order), lm.batch_size):
        chunk = order[start:start + lm.batch_size]
        first = has_bos_prefix(contexts[chunk[0]], bos)
        flags.update({i: first for i in chunk})
    return flags


def group_by_kwargs(requests) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    return groups


def prepare_group(lm, requests, idxs: list[int]):
    """(prompts {index: tokens}, until, max_gen_toks) for one gen_kwargs group, or None when not greedy."""
    kwargs = dict(normalize_gen_kwargs(requests[idxs[0]].args[1], HFLM_MAX_GEN_TOKS))
    reason = not_greedy_reason(kwargs, lm.model)
    if reason:
        log.info("FastLM: %d generate_until request(s) use %s: generated by HFLM on the same model", len(idxs),
                 reason)
        return None
    eos = lm.tokenizer.decode(lm.eot_token_id, skip_special_tokens=False)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_gen = int(kwargs.pop("max_gen_toks"))
    max_ctx = lm.max_length - max_gen
    if max_ctx <= 0:
        raise CkptEvalError(f"generate_until asks for max_gen_toks={max_gen}, which leaves no room for the prompt "
                            f"in the model's max_length {lm.max_length}: lower max_gen_toks (harness.gen_kwargs)")
    contexts = [req.args[0] for req in requests]
    flags = hflm_special_flags(lm, contexts, idxs)
    prompts = {}
    for i in idxs:
        kw = {"add_special_tokens": False} if flags[i] else {}
        prompts[i] = tuple(lm.tokenizer(contexts[i], **kw)["input_ids"][-max_ctx:])
    return prompts, until, max_gen


def eos_ids(model) -> set[int]:
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def settled(text: str, until: list[str]) -> bool:
    """Whether HFLM's cut of `text` can no longer change as text is appended.

    `postprocess_generated_text` splits at each stop string in turn (not at the earliest hit of any), so a hit of
    a later string is lost when an earlier string's first hit starts inside it, and that hit may still be
    generated. Walk the strings in HFLM's order keeping how much of each stage's text is certain: a string found
    there fixes the stage's text exactly; one not found, while the text is still open, leaves certain only what
    no later hit of it can reach. The last character stays uncertain (a tokenizer may rewrite it: an incomplete
    UTF-8 sequence, a cleaned-up space)."""
    known, exact = max(0, len(text.rstrip("\ufffd")) - 1), False
    for term in until:
        if not term:
            continue
        hit = text.find(term, 0, known)
        if hit >= 0:
            known, exact = hit, True
        elif not exact:
            known = max(0, known - len(term) + 1)
    return exact


@dataclass
class _Row:
    """One prompt being decoded: its KV sits in slot `position in the active list` of the slot cache."""

    idx: int  # request index
    length: int  # tokens in its KV cache = the position (and cache column) of the next token fed
    gen: list[int] = field(default_factory=list)  # generated tokens, the last one not yet fed


class _SlotLayer(DynamicLayer):
    """One layer's keys/values for up to `rows` sequences in preallocated [rows, cap, H, D] buffers.

    Row r holds its tokens in columns 0..len_r-1 (prompt, then generated tokens). A decode step writes each
    row's new key/value at its own column (`cols`, its position; one index_copy_ into the flattened
    rows x cap dim) and attention reads the first `width` columns of the first `n` rows as a [n, H, width, D]
    view: nothing is copied per step (DynamicLayer re-concatenates the whole cache every step)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, state: dict) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.buf_k, self.buf_v, self.state = keys, values, state

    def update(self, key_states, value_states, *args, **kwargs):
        n, flat, width = self.state["n"], self.state["flat"], self.state["width"]
        for buf, new in ((self.buf_k, key_states), (self.buf_v, value_states)):
            buf.view(-1, *buf.shape[2:]).index_copy_(0, flat, new[:, :, 0])
        self.keys = self.buf_k[:n, :width].transpose(1, 2)
        self.values = self.buf_v[:n, :width].transpose(1, 2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return int(self.state["width"]) - 1


class _SlotCache:
    """Per-layer slot buffers for the decode batch; rows are kept compact in slots 0..n-1."""

    def __init__(self, like: list[tuple[torch.Tensor, torch.Tensor]], rows: int, cap: int) -> None:
        from transformers import DynamicCache

        self.cap = cap
        self.state: dict = {"n": 0, "flat": None, "width": 0}
        self.layers = []
        for k, _ in like:
            shape = (rows, cap, k.shape[1], k.shape[3])
            self.layers.append(_SlotLayer(k.new_zeros(shape), k.new_zeros(shape), self.state))
        self.cache = DynamicCache()
        self.cache.layers = self.layers

    def put(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]], row: int, length: int) -> None:
        """Copy row `row`'s first `length` positions of a prefill cache ([rows, H, T, D] per layer) into `slot`."""
        for layer, (k, v) in zip(self.layers, kv):
            layer.buf_k[slot, :length] = k[row, :, :length].transpose(0, 1)
            layer.buf_v[slot, :length] = v[row, :, :length].transpose(0, 1)

    def move(self, src: int, dst: int, length: int) -> None:
        for layer in self.layers:
            layer.buf_k[dst, :length] = layer.buf_k[src, :length]
            layer.buf_v[dst, :length] = layer.buf_v[src, :length]

    def step(self, lm, rows: list[_Row]) -> list[int]:
        """Feed every row's last generated token at its own position; the next greedy token per row."""
        cols = torch.tensor([r.length for r in rows], device=lm.device)
        width = int(max(r.length for r in rows)) + 1
        flat = torch.arange(len(rows), device=lm.device) * self.cap + cols
        self.state.update(n=len(rows), flat=flat, width=width)
        mask = torch.arange(width, device=lm.device)[None, :] <= cols[:, None]
        nxt = torch.tensor([[r.gen[-1]] for r in rows])
        logits = lm.forward(nxt, cols[:, None], mask[:, None, None, :], torch.ones(len(rows), 1, dtype=torch.bool),
                            self.cache)
        return logits.argmax(-1).tolist()


def prefill(lm, shared: tuple[int, ...], rows: list[tuple[int, ...]], golds: list[tuple[int, ...]] | None = None):
    """Run `rows` (each after the common `shared` prefix, whose KV comes from the prefix store): the first greedy
    token of each row, the per-layer keys/values [rows, H, S + longest row, D] (right-padded; a row's prompt is
    its first columns) and, per row, (loglikelihood, is_greedy) of its gold continuation `golds[k]` (None for
    none). A gold continuation rides in the same forward after its prompt::

        row k      p0 p1 .. pn | g0 g1 .. g(m-2)      the prompt, then the gold tokens but the last
        kept          ^^ ^^^^^^^^^^^^^^^^^^^^^^^      pn predicts the first generated token and g0, gi predicts g(i+1)

    attention is causal, so the prompt's logits and keys/values are those of the prompt alone; the gold tokens'
    keys/values are dropped (`_SlotCache.put` copies the prompt's columns), and the gold scores are what
    `loglikelihood(prompt, gold)` computes (float32 log-softmax at the scored positions, summed)."""
    from transformers import DynamicCache

    golds = golds or [()] * len(rows)
    seqs = [tuple(r) + tuple(g[:-1]) for r, g in zip(rows, golds)]
    b, S = len(rows), len(shared)
    lens = torch.tensor([len(r) for r in seqs])
    T = int(lens.max())
    ids = torch.zeros(b, T, dtype=torch.long)
    keep = torch.zeros(b, T, dtype=torch.bool)
    flat, targets, owner, first_rows = [], [], [], []  # kept rows in row-major order: scored tokens, next tokens
    base = 0
    for k, (r, g, seq) in enumerate(zip(rows, golds, seqs)):
        ids[k, :len(seq)] = torch.tensor(seq)
        keep[k, len(r) - 1:len(seq)] = True  # max(1, len(g)) kept rows
        first_rows.append(base)
        flat += range(base, base + len(g))
        targets += g
        owner += [k] * len(g)
        base += max(1, len(g))
    mask = None  # right padding: real tokens see only real tokens before them, the causal kernel is enough
    cache = lm.new_cache(shared, b)
    if cache is None:
        cache = DynamicCache()
    else:
        valid = torch.arange(T)[None, :] < lens[:, None]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = torch.cat([torch.ones(b, T, S, dtype=torch.bool), causal[None] & valid[:, None, :]], dim=2)[:, None]
    pos = torch.arange(S, S + T).expand(b, T)
    scores: list[tuple[float, bool] | None] = [None] * b
    if not targets:
        first = lm.forward(ids, pos, mask, keep, cache).argmax(-1)
    else:
        per_row, first = lm._continuation_scores(ids, pos, mask, keep, cache, flat, targets, owner, b,
                                                 greedy_rows=torch.tensor(first_rows))
        scores = [score if g else None for score, g in zip(per_row, golds)]
    return first.tolist(), [(layer.keys, layer.values) for layer in cache.layers], scores


def greedy_generate(lm, jobs: list[tuple[int, tuple[int, ...], tuple[int, ...]]], max_gen: int, until: list[str],
                    stop_ids: set[int], progress=None, out: list | None = None, gold: dict | None = None,
                    scores: dict | None = None) -> list[tuple[int, str]]:
    """(request index, text cut like HFLM's) for `jobs` = (request index, shared prefix, rest of the prompt).

    Continuous batching over at most `lm.batch_size` rows: jobs are prefilled in their order, consecutive jobs
    of one shared prefix together, on top of that prefix's cached KV; their caches move into one slot cache, and
    rows of any prefix decode together, one token per row per step, each at its own position. A finished row
    leaves at once; when half the slots are free (or none is busy), waiting jobs are prefilled into them.

    Slots and prefill rows come from `lm.rows_plan` (harness.batch_size, or auto: what memory holds); finished
    rows are appended to `out` as they finish (what an out-of-memory retry need not run again). `gold`
    ({request index: continuation tokens}) are scored in the prefills (`prefill`), into `scores`
    ({request index: (loglikelihood, is_greedy)})."""
    out = [] if out is None else out
    gold = gold or {}
    scores = {} if scores is None else scores
    if not jobs:
        return out
    if max_gen <= 0:
        out += [(i, postprocess_generated_text("", until, None)) for i, _, _ in jobs]
        return out
    waiting = collections.deque(jobs)
    cap = max(len(s) + len(r) for _, s, r in jobs) + max_gen
    rows = lm.rows_plan.gen_rows(cap)
    active: list[_Row] = []
    slots = None
    refill_at = max(1, rows // 2)
    extra = max((len(gold[i]) - 1 for i, _, _ in jobs if gold.get(i)), default=0)  # gold tokens ride in prefills
    while waiting or active:
        fresh: list[_Row] = []
        while waiting and (rows - len(active) >= refill_at or not active):
            shared = waiting[0][1]
            new = len(waiting[0][2]) + extra  # the longest of its prefix's run: jobs come longest first
            limit = lm.rows_plan.rows(new, len(shared) + new, share=0.5)
            chunk = []
            while waiting and waiting[0][1] == shared and len(active) + len(chunk) < rows and len(chunk) < limit:
                chunk.append(waiting.popleft())
            first, kv, scored = prefill(lm, shared, [r for _, _, r in chunk], [gold.get(i, ()) for i, _, _ in chunk])
            scores.update((i, score) for (i, _, _), score in zip(chunk, scored) if score is not None)
            if slots is None:
                slots = _SlotCache(kv, rows, cap)
            for j, ((i, s, r), tok) in enumerate(zip(chunk, first)):
                slots.put(len(active), kv, j, len(s) + len(r))
                row = _Row(i, len(s) + len(r), [tok])
                active.append(row)
                fresh.append(row)
            del kv
        if not fresh:
            for row, tok in zip(active, slots.step(lm, active)):
                row.length += 1
                row.gen.append(tok)
        done = len(out)
        active = _retire(lm, slots, active, out, max_gen, until, stop_ids)
        for _ in range(len(out) - done if progress else 0):
            progress()
    return out


def _retire(lm, slots: _SlotCache, active: list[_Row], out: list, max_gen: int, until: list[str],
            stop_ids: set[int]) -> list[_Row]:
    """Move finished rows to `out` (text cut like HFLM's); the last busy slot fills each freed one."""
    k = 0
    while k < len(active):
        row = active[k]
        text = lm.tokenizer.decode(row.gen, skip_special_tokens=True)
        if row.gen[-1] in stop_ids or len(row.gen) >= max_gen or settled(text, until):
            out.append((row.idx, postprocess_generated_text(text, until, None)))
            last = active.pop()
            if last is not row:
                slots.move(len(active), k, last.length)
                active[k] = last
            continue
        k += 1
    return active

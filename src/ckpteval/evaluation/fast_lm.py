"""FastLM: an lm-eval backend that returns HFLM's loglikelihoods while running each shared context once.

Multiple-choice tasks ask ``loglikelihood(context, choice)`` once per choice, and lm-eval's ``HFLM`` runs the
whole context again for every choice (its one-token cache only helps when every choice is a single token).
FastLM tokenizes every distinct string once, groups requests by the exact token prefix HFLM conditions on
(after its left truncation to ``max_length``), and packs that prefix with all of its continuations into one
row::

    tokens     c0 c1 c2 c3 | a1 a2 | b1 | d1 d2      prefix, then each continuation minus its last token
    positions   0  1  2  3 |  4  5 |  4 |  4  5      every continuation continues the prefix's positions

A 4-D attention mask lets each continuation see the prefix and itself, nothing else, so every scored token
sees exactly the keys and positions it sees in HFLM's separate sequence: the results agree to float
rounding. The vocabulary projection runs only at scored positions (``logits_to_keep``) and log-softmax is
float32 (HFLM's is in the model dtype). Rows are sorted by length and run ``batch_size`` at a time, so
padding is small.

Across documents, prefixes shared by several groups (a few-shot preamble: MMLU's dev examples, a ``first_n``
sampler) are found with a radix-tree plan (``prefix_cache.plan_shared_prefixes``), run once, and their keys and
values kept (``PrefixStore``, at most ``prefix_cache_tokens`` tokens, least recently used evicted); each batch of
documents under such a prefix runs on top of it, the prefix cache expanded (not copied) to the batch::

    [ shared prefix KV, positions 0..S-1 ]  +  row: doc remainder | cont a | cont b ...  positions S, S+1, ...

``loglikelihood_rolling`` uses the same engine on HFLM's rolling windows, windows of different documents
batched together; ``generate_until`` decodes greedily on the same engine (``generate``), giving HFLM's text.

Data parallel (``world_size > 1``, ``torch.distributed`` initialised): every rank receives all requests,
context groups are split across ranks by token count, and every rank gets all results back in the original
order. The evaluator therefore sees ``rank == 0``, ``world_size == 1`` on every process (the contract lm-eval
keeps for launchers that distribute inside the model, e.g. its tensor-parallel mode): it builds the same
requests everywhere, metrics are computed from identical, complete results, and ``simple_evaluate`` returns
them where ``LOCAL_RANK == 0``. Nothing here needs ``accelerate``, so a model already in memory works.

    lm = FastLM(model, tokenizer, batch_size=8, dtype="bfloat16")
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])
"""

from __future__ import annotations

import contextlib
import heapq
import inspect
import logging
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import has_bos_prefix, resolve_max_length
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ckpteval.errors import CkptEvalError
from ckpteval.evaluation import generate as gen
from ckpteval.evaluation.auto_batch import RowPlanner, is_auto, is_oom
from ckpteval.evaluation.loss import _PLAIN_HEAD_TYPES, additive_mask, auto_chunk
from ckpteval.evaluation.prefix_cache import PrefixStore, cache_tensors, expanded_cache, plan_shared_prefixes
from ckpteval.evaluation.request_cache import token_memo
from ckpteval.evaluation.result_store import continuation_keys, request_key
from ckpteval.evaluation.resume import GEN_SEGMENT_BATCHES, report, stored_units

log = logging.getLogger(__name__)

_DEFAULT_MAX_LENGTH = 2048  # HFLM._DEFAULT_MAX_LENGTH: used when neither config nor tokenizer name one
_MASKABLE_ATTENTION = {"sdpa", "eager"}  # implementations that take an arbitrary 4-D mask tensor


@dataclass
class _Unit:
    """One batch: items that all continue the same shared prefix (empty: nothing shared)."""

    shared: tuple[int, ...]
    items: list  # _Group (loglikelihood) or (request index, prompt suffix) (generation)
    cost: int  # tokens run for it, for the data-parallel split


@dataclass
class _Group:
    """Requests that condition on the same token prefix: the prefix runs once, each continuation after it."""

    prefix: tuple[int, ...]
    conts: list[tuple[int, ...]] = field(default_factory=list)  # distinct continuations
    members: list[list[int]] = field(default_factory=list)  # request indices per continuation

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(c) - 1 for c in self.conts)


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    from ckpteval.dtypes import torch_dtype

    return torch_dtype(dtype)


class FastLM(TemplateLM):
    """Exact, faster stand-in for ``HFLM(pretrained=model, tokenizer=tokenizer)`` on loglikelihood requests.

    Args:
        model: an in-memory transformers causal LM (eval mode).
        tokenizer: its HF tokenizer.
        batch_size: rows (context groups, or rolling windows) per forward pass; "auto": as many rows of each
            batch's length as fit the device's free memory (``auto_batch.RowPlanner``).
        device: where inputs go; defaults to the model's device (the model is never moved).
        dtype: compute dtype. None: the model's own. bfloat16/float16 on a float32 model: autocast.
        rank, world_size: this process's data-parallel coordinates (``torch.distributed`` must be initialised
            when world_size > 1). Requests are sharded internally; see the module docstring.
        max_length: as HFLM's ``max_length`` (default: from the model config / tokenizer, else 2048).
        group: the process group for the data-parallel gather (default: the world).
        prefix_cache_tokens: cap on the tokens of shared prefixes whose keys/values are kept (0: no sharing
            beyond identical contexts).
        memory_budget_gb: batch_size="auto": the memory a forward may use (default: 0.9 x free GPU memory,
            0.5 x available RAM).
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, device=None, dtype=None, rank: int = 0,
                 world_size: int = 1, max_length: int | None = None, group=None,
                 prefix_cache_tokens: int = 8192, memory_budget_gb: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size_per_gpu = _parse_batch_size(batch_size)
        self.rows_plan = RowPlanner(self, "auto" if is_auto(batch_size) else self.batch_size_per_gpu,
                                    memory_budget_gb)
        first = next(model.parameters())
        self._device = first.device  # inputs follow the model, which is never moved
        asked = torch.device(device) if device is not None else first.device
        if asked.type != first.device.type or asked.index not in (None, first.device.index):
            raise CkptEvalError(f"FastLM: the model is on {first.device} but device={asked} was asked: "
                                "move the model first or leave device unset")
        model_dtype = first.dtype
        self.compute_dtype = _resolve_dtype(dtype) or model_dtype
        if self.compute_dtype == model_dtype:
            self._autocast = None
        elif model_dtype == torch.float32 and self.compute_dtype in (torch.bfloat16, torch.float16):
            self._autocast = self.compute_dtype
        else:
            raise CkptEvalError(f"FastLM: the model weights are {model_dtype} and {self.compute_dtype} compute "
                                f"was asked: load the model in {self.compute_dtype} instead")
        self.dp_rank, self.dp_size, self.group = int(rank), int(world_size), group
        if self.dp_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise CkptEvalError("FastLM: world_size > 1 needs torch.distributed initialised (launch with torchrun)")
        self._max_length = max_length
        self._prefix_str = tokenizer.decode(self.prefix_token_id)
        self._attn_impl = getattr(model.config, "_attn_implementation", None) or "eager"
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        # logits are exactly output_embeddings(last hidden state): score from hidden states, a chunk at a time
        self._plain_head = getattr(model.config, "model_type", None) in _PLAIN_HEAD_TYPES and \
            model.get_output_embeddings() is not None
        self._hflm = None
        self.prefix_store = PrefixStore(max_tokens=int(prefix_cache_tokens))
        self.results = None  # a result-store entry (result_store.Entry): batches found there are not run again
        # generate_until request -> the gold continuation `gold.add_gold_scores` will score after its prompt (set by
        # the harness when bpb is on): scored in the generation's own prefill (`generate.prefill`), kept here
        self.gold_target = None
        self._gold_scores: dict[tuple[str, str], tuple[float, bool]] = {}
        self.forward_seconds = 0.0  # time in model forwards and vocabulary scoring (`_compute`: not overhead)
        if self._attn_impl not in _MASKABLE_ATTENTION:
            log.warning("FastLM: attention implementation %r takes no custom mask; loglikelihood requests go "
                        "through HFLM (exact, not faster)", self._attn_impl)

    # ---- what lm-eval reads ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return resolve_max_length(self.model.config, self.tokenizer, default=_DEFAULT_MAX_LENGTH)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def rank(self) -> int:
        return 0  # see the module docstring: sharding happens inside, the evaluator must not shard again

    @property
    def world_size(self) -> int:
        return 1

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.compute_dtype), "backend": "ckpteval-fast"}

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.hflm.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    @property
    def hflm(self):
        """An ``HFLM`` on the same model object, built on first use (generation, unsupported attention)."""
        if self._hflm is None:
            from lm_eval.models.huggingface import HFLM

            batch = "auto" if self.rows_plan.auto else self.batch_size  # HFLM's own auto for what it runs
            self._hflm = HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=batch,
                              max_length=self._max_length, mixed_precision_dtype=self._autocast)
        self._hflm.cache_hook = self.cache_hook
        return self._hflm

    # ---- tokenization: HFLM's rules, each distinct string encoded once, in batches ----------------------
    def _special_kwargs(self, string: str, add_special_tokens: bool | None) -> dict:
        if add_special_tokens is not None:
            return {"add_special_tokens": add_special_tokens}
        if has_bos_prefix(string, self._prefix_str):  # HFLM: no second BOS when the text starts with one
            return {"add_special_tokens": False}
        return {}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kw):
        enc = self.tokenizer.encode(string, **self._special_kwargs(string, add_special_tokens))
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def _encode_many(self, strings, add_special_tokens: bool | None = None) -> dict[str, list[int]]:
        by_kwargs: dict[tuple, list[str]] = {}
        for s in dict.fromkeys(strings):
            by_kwargs.setdefault(tuple(self._special_kwargs(s, add_special_tokens).items()), []).append(s)
        out = {}
        memo = token_memo(self.tokenizer)  # shared by every FastLM on an identical tokenizer (a scan)
        for kwargs, batch in by_kwargs.items():
            todo = [s for s in batch if (s, kwargs) not in memo]
            if todo:
                memo.update(zip(((s, kwargs) for s in todo), self.tokenizer(todo, **dict(kwargs))["input_ids"]))
            out.update((s, memo[(s, kwargs)]) for s in batch)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._loglikelihood_tokens(self._tokenized(requests), disable_tqdm=disable_tqdm)

    def _tokenized(self, requests) -> list[tuple[tuple[str, str], list[int], list[int]]]:
        """TemplateLM.loglikelihood's encoding (trailing context spaces move to the continuation; an empty
        context becomes the prefix token), with each distinct string tokenized once, in batches."""
        pairs = [req.args for req in requests]
        split = {}
        for ctx, cont in pairs:
            if ctx:
                n_spaces = len(ctx) - len(ctx.rstrip())
                split[(ctx, cont)] = (ctx[:len(ctx) - n_spaces], ctx[len(ctx) - n_spaces:] + cont)
        enc = self._encode_many([s for c, k in split.values() for s in (c, c + k)])
        plain = self._encode_many([cont for ctx, cont in pairs if not ctx], add_special_tokens=False)
        new_reqs = []
        for ctx, cont in pairs:
            if ctx:
                c, k = split[(ctx, cont)]
                ctx_enc = enc[c]
                cont_enc = enc[c + k][len(ctx_enc):]
            else:
                cont_enc = plain[cont]
                if not cont_enc:
                    raise CkptEvalError(f"loglikelihood request with empty context and continuation {cont!r} "
                                        "that encodes to no tokens")
                if self.prefix_token_id != cont_enc[0]:
                    ctx_enc = [self.prefix_token_id]
                else:
                    ctx_enc, cont_enc = cont_enc[:1], cont_enc[1:]
            new_reqs.append(((ctx, cont), ctx_enc, cont_enc))
        return new_reqs

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM's rolling windows (prefix token, ``max_length`` windows, context_len=1), scored by our engine."""
        strings = [req.args[0] for req in requests]
        enc = self._encode_many(strings)
        windows, owners = [], []
        for i, s in enumerate(strings):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=enc[s], prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm, kind="roll")
        totals = [0.0] * len(strings)
        for i, (ll, _) in zip(owners, scores):
            totals[i] += ll
        for s, total in zip(strings, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (s,), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation on this engine (see `generate`); other settings through HFLM. Requests are split
        across data-parallel ranks by batches; every rank gets every result. With `gold_target`, each prompt's
        gold continuation is scored in the prompt's own prefill (`take_gold_scores`)."""
        if not requests:
            return []
        local: list[tuple[int, tuple[str, tuple | None]]] = []  # (request, (text, gold score or None))
        reused: list[tuple[int, tuple[str, tuple | None]]] = []  # read from the result store: every rank holds them
        golds: dict[int, tuple[str, tuple[int, ...]]] = {}
        delegated: list[int] = []
        usable = self._attn_impl in _MASKABLE_ATTENTION
        pbar = tqdm(total=len(requests), desc="generate_until (fast)", disable=disable_tqdm or self.dp_rank != 0)
        for idxs in gen.group_by_kwargs(requests).values():
            prepared = gen.prepare_group(self, requests, idxs) if usable else None
            if prepared is None:
                delegated += idxs
                continue
            prompts, until, max_gen = prepared
            found = self._gold_tokens(requests, idxs, prompts)
            golds.update(found)
            gold = {i: tokens for i, (_, tokens) in found.items()}
            units = self._plan([prompts[i] for i in idxs], idxs, lambda i: len(prompts[i]))
            if self.results is not None:
                computed, read = self._generate_segments(units, prompts, until, max_gen, pbar, gold)
                local += computed
                reused += read
                continue
            jobs = [(i, u.shared, prompts[i][len(u.shared):]) for u in _shard(units, self.dp_rank, self.dp_size)
                    for i in u.items]  # this rank's prompts, a shared prefix's prompts adjacent, longest first
            scores: dict[int, tuple[float, bool]] = {}
            texts = self._generate(jobs, max_gen, until, progress=lambda: pbar.update(self.dp_size), gold=gold,
                                   scores=scores)
            local += [(i, (text, scores.get(i))) for i, text in texts]
        pbar.close()
        if delegated:
            mine = delegated[self.dp_rank::self.dp_size]
            outs = self.hflm.generate_until([requests[i] for i in mine], disable_tqdm=disable_tqdm)
            local += [(i, (text, None)) for i, text in zip(mine, outs)]
        results = self._gather_ordered(local, len(requests))
        for i, pair in reused:
            results[i] = pair
        for i, (cont, _) in golds.items():
            if results[i][1] is not None:
                self._gold_scores[(requests[i].args[0], cont)] = results[i][1]
        results = [text for text, _ in results]
        for req, text in zip(requests, results):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results

    def _gold_tokens(self, requests, idxs: list[int], prompts: dict) -> dict[int, tuple[str, tuple[int, ...]]]:
        """{request: (gold continuation, its tokens)} for the prompts whose gold continuation `loglikelihood`
        would score after exactly the prompt's tokens (its encoding and left truncation give the same prefix):
        those are scored in the prompt's prefill. The others (none without `gold_target`) are scored later by
        `loglikelihood`, as before."""
        if self.gold_target is None:
            return {}
        conts = {i: self.gold_target(requests[i]) for i in idxs if requests[i].args[0]}
        conts = {i: c for i, c in conts.items() if c}
        if not conts:
            return {}
        encoded = self._tokenized([SimpleNamespace(args=(requests[i].args[0], c)) for i, c in conts.items()])
        out = {}
        for (i, c), (_, ctx, cont) in zip(conts.items(), encoded):
            if cont and len(cont) <= self.max_length and \
                    _conditioning_prefix(ctx, cont, self.max_length) == prompts[i]:
                out[i] = (c, tuple(cont))
        return out

    def take_gold_scores(self) -> dict[tuple[str, str], tuple[float, bool]]:
        """{(prompt, gold continuation): (loglikelihood, is_greedy)} scored during generation since the last
        call (every rank holds all of them); the store is emptied."""
        scores, self._gold_scores = self._gold_scores, {}
        return scores

    def _generate_segments(self, units: list[_Unit], prompts: dict, until: list[str], max_gen: int, pbar,
                           gold: dict[int, tuple[int, ...]]) -> tuple[list, list]:
        """Greedy generation with the result store: segments of `GEN_SEGMENT_BATCHES` consecutive batches, each
        decoded as one continuous batch on its own (rows of a batch share every decode step, so a segment gives the
        same text whichever rank runs it and whatever ran before). Segments the store holds are read; the rest
        are split over ranks and recorded as each finishes, the gold scores of their prefills (`gold`) with
        them. (this rank's (request index, (text, gold score or None)) pairs, the pairs read from the store,
        which every rank holds)."""
        segments = [units[k:k + GEN_SEGMENT_BATCHES] for k in range(0, len(units), GEN_SEGMENT_BATCHES)]
        seen: dict[str, int] = {}

        def numbered(base: str) -> str:  # identical requests: one key each, numbered in plan order
            seen[base] = seen.get(base, -1) + 1
            return f"{base}#{seen[base]}"

        keys, gold_keys = {}, {}
        for i in [i for u in units for i in u.items]:
            keys[i] = numbered(request_key("gen", prompts[i], until, max_gen))
            if i in gold:
                gold_keys[i] = numbered(continuation_keys("gold", prompts[i], [gold[i]])[0])

        def order(seg):
            return [i for u in seg for i in u.items]

        def seg_keys(k: int) -> list[str]:
            items = order(segments[k])
            return [keys[i] for i in items] + [gold_keys[i] for i in items if i in gold]

        done, saved = stored_units(self.results, len(segments), seg_keys, main=self.dp_rank == 0,
                                   world=self.dp_size, group=self.group)
        reused = []
        for k, values in done.items():
            items = order(segments[k])
            scores = iter(values[len(items):])
            reused += [(i, (text, tuple(next(scores)) if i in gold else None)) for i, text in zip(items, values)]
        if self.dp_rank == 0:
            report("generate_until", len(reused), len(keys), "requests", saved, self.results)
        pbar.update(len(reused))
        todo = [_Unit((), seg, sum(u.cost for u in seg)) for k, seg in enumerate(segments) if k not in done]
        out = []
        for segment in _shard(todo, self.dp_rank, self.dp_size):
            jobs = [(i, u.shared, prompts[i][len(u.shared):]) for u in segment.items for i in u.items]
            start = time.perf_counter()
            scores: dict[int, tuple[float, bool]] = {}
            texts = dict(self._generate(jobs, max_gen, until, progress=lambda: pbar.update(self.dp_size), gold=gold,
                                        scores=scores))
            self.results.add([(keys[i], texts[i]) for i, _, _ in jobs]
                             + [(gold_keys[i], list(scores[i])) for i, _, _ in jobs if i in gold],
                             time.perf_counter() - start)
            out += [(i, (texts[i], scores.get(i))) for i, _, _ in jobs]
        return out, reused

    # ---- the engine ----------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, kind: str = "ll",
                              **kw) -> list[tuple[float, bool]]:
        """Score (key, context_tokens, continuation_tokens) requests; results in request order. `kind` (ll, or
        roll for rolling windows) names them in the result store."""
        if not requests:
            return []
        if self._attn_impl not in _MASKABLE_ATTENTION:
            return self.hflm._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm)
        groups = self._group(requests)
        units = self._plan([g.prefix for g in groups], groups, lambda g: g.length,
                           plain=lambda g: len(g.conts) == 1)
        done, keys = self._stored_batches(units, kind, len(requests))
        mine = _shard([u for k, u in enumerate(units) if k not in done], self.dp_rank, self.dp_size)
        pbar = tqdm(total=sum(len(m) for u in mine for g in u.items for m in g.members), desc="loglikelihood (fast)",
                    disable=disable_tqdm or self.dp_rank != 0)
        local = []
        for unit in mine:
            start = time.perf_counter()
            scored = self._score_unit(unit.items, unit.shared)
            if self.results is not None:
                self.results.add(zip(keys(unit), [s for scores in scored for s in scores]),
                                 time.perf_counter() - start)
            for g, scores in zip(unit.items, scored):
                for members, score in zip(g.members, scores):
                    local += [(i, score) for i in members]
                    pbar.update(len(members))
        pbar.close()
        results = self._gather_ordered(local, len(requests))
        for k, values in done.items():  # batches read from the store: every rank fills them in
            conts = [members for g in units[k].items for members in g.members]
            for members, (ll, greedy) in zip(conts, values):
                for i in members:
                    results[i] = (float(ll), bool(greedy))
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def _stored_batches(self, units: list[_Unit], kind: str, n_requests: int):
        """({batch index: its (loglikelihood, is_greedy) results} for the batches the result store holds, a
        function giving a batch's keys in `_score_batch`'s result order). Nothing without a store."""
        def keys(unit: _Unit) -> list[str]:
            return [k for g in unit.items for k in continuation_keys(kind, g.prefix, g.conts)]

        if self.results is None:
            return {}, keys
        done, saved = stored_units(self.results, len(units), lambda k: keys(units[k]), main=self.dp_rank == 0,
                                   world=self.dp_size, group=self.group)
        if self.dp_rank == 0:
            reused = sum(len(m) for k in done for g in units[k].items for m in g.members)
            what = "loglikelihood_rolling" if kind == "roll" else "loglikelihood"
            report(what, reused, n_requests, "windows" if kind == "roll" else "requests", saved, self.results)
        return done, keys

    def _group(self, requests) -> list[_Group]:
        """Group by the prefix HFLM conditions on: its input is (ctx + cont)[-(L+1):][:-1], whose last
        len(cont) positions predict cont, so the prefix is that input minus cont[:-1]."""
        L = self.max_length
        groups: dict[tuple[int, ...], _Group] = {}
        slots: dict[tuple, int] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise CkptEvalError(f"loglikelihood request {i} has an empty context or continuation after "
                                    "tokenization")
            if len(cont) > L:
                raise CkptEvalError(f"loglikelihood request {i}: continuation of {len(cont)} tokens exceeds the "
                                    f"model's max_length {L}")
            prefix, cont = _conditioning_prefix(ctx, cont, L), tuple(cont)
            g = groups.setdefault(prefix, _Group(prefix))
            slot = slots.setdefault((prefix, cont), len(g.conts))
            if slot == len(g.conts):
                g.conts.append(cont)
                g.members.append([])
            g.members[slot].append(i)
        return [part for g in groups.values() for part in _split_long(g)]

    def _plan(self, seqs: list[tuple[int, ...]], items: list, length, plain=None) -> list[_Unit]:
        """Batches of `items` (whose token sequences are `seqs`), those sharing a long prefix together, that
        prefix split off; longest first within a prefix (a too-large batch fails at once; similar lengths pad
        little). Units of one prefix stay adjacent so its cache is reused while it is needed. `plain(item)`:
        the item needs no attention mask when nothing is shared; such items are batched apart from the others
        so their batches take the plain causal kernel (`_score_batch`)."""
        units = []
        for shared_len, members in plan_shared_prefixes(seqs, self.prefix_store.max_tokens):
            members.sort(key=lambda m: -length(items[m]))
            parts = [members]
            if plain is not None and shared_len == 0:
                parts = [[m for m in members if plain(items[m])], [m for m in members if not plain(items[m])]]
            shared = seqs[members[0]][:shared_len]
            for part in parts:
                start = 0
                while start < len(part):  # longest first: the first item's length sizes the batch
                    new = length(items[part[start]]) - shared_len
                    chunk = [items[m] for m in part[start:start + self.rows_plan.rows(new, shared_len + new)]]
                    cost = sum(length(x) - shared_len for x in chunk) + shared_len
                    units.append(_Unit(shared, chunk, cost))
                    start += len(chunk)
        return units

    def _score_unit(self, items: list[_Group], shared: tuple[int, ...]) -> list[list[tuple[float, bool]]]:
        """`_score_batch`; after an out-of-memory error (batch_size=auto) the batch is split smaller and each
        piece scored (a group's scores do not depend on the rows beside it)."""
        try:
            return self._score_batch(items, shared)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not is_oom(exc):
                raise
        rows = self.rows_plan.after_oom(len(items))  # outside the except block: the failed forward's tensors are gone
        return [s for start in range(0, len(items), rows) for s in self._score_unit(items[start:start + rows], shared)]

    def _generate(self, jobs, max_gen: int, until: list[str], progress, gold: dict | None = None,
                  scores: dict | None = None) -> list[tuple[int, str]]:
        """`generate.greedy_generate` (`gold`, `scores`: the gold continuations scored in the prefills); after an
        out-of-memory error (batch_size=auto) the rows not yet finished run again with fewer slots (a row's greedy
        text does not depend on the rows beside it)."""
        out: list[tuple[int, str]] = []
        while True:
            done = {i for i, _ in out}
            try:
                return gen.greedy_generate(self, [j for j in jobs if j[0] not in done], max_gen, until,
                                           gen.eos_ids(self.model), progress=progress, out=out, gold=gold,
                                           scores=scores)
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
            cap = max(len(s) + len(r) for _, s, r in jobs) + max_gen
            self.rows_plan.after_oom(max(2, self.rows_plan.gen_rows(cap)))

    def probe_forward(self, rows: int, length: int) -> None:
        """`rows` packed rows of `length` random tokens through the 4-D-mask path, every position scored: the
        costliest forward FastLM runs, which `harness.batch_size=auto` measures."""
        g = torch.Generator().manual_seed(0)
        vocab = int(self.model.config.vocab_size)
        ids = torch.randint(0, vocab, (rows, length), generator=g)
        mask = torch.ones(length, length, dtype=torch.bool).tril().expand(rows, 1, length, length)
        keep = torch.ones(rows, length, dtype=torch.bool)
        targets = torch.randint(0, vocab, (rows * length,), generator=g)
        lp, _, _ = self._token_scores(ids, torch.arange(length).expand(rows, length), mask, keep, None,
                                      torch.arange(rows * length), targets)
        lp.sum().item()

    def _score_batch(self, batch: list[_Group], shared: tuple[int, ...] = ()) -> list[list[tuple[float, bool]]]:
        """One forward over packed rows (after `shared`, whose KV comes from the prefix store); per group,
        (loglikelihood, is_greedy) for each continuation."""
        S = len(shared)
        batch = [_Group(g.prefix[S:], g.conts, g.members) for g in batch]
        T = max(g.length for g in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        pos = torch.zeros(len(batch), T, dtype=torch.long)
        seg = torch.full((len(batch), T), -1, dtype=torch.long)  # 0: prefix, j+1: continuation j, -1: padding
        keep = torch.zeros(len(batch), T, dtype=torch.bool)
        flat, targets, owner = [], [], []  # per scored token: row of the kept logits, target token, continuation
        base = n_conts = 0
        for b, g in enumerate(batch):
            P = len(g.prefix)
            tokens, positions, segs = list(g.prefix), list(range(S, S + P)), [0] * P
            for j, c in enumerate(g.conts):
                # kept rows are positions P-1 .. n-1 of this row, in order: P-1 predicts c[0], then c[:-1]'s
                # positions predict c[1:]
                flat += [base] + [base + len(tokens) - P + 1 + k for k in range(len(c) - 1)]
                targets += c
                owner += [n_conts + j] * len(c)
                tokens += c[:-1]
                positions += range(S + P, S + P + len(c) - 1)
                segs += [j + 1] * (len(c) - 1)
            n = len(tokens)
            ids[b, :n] = torch.tensor(tokens)
            pos[b, :n] = torch.tensor(positions)
            seg[b, :n] = torch.tensor(segs)
            keep[b, P - 1:n] = True
            base += n - P + 1
            n_conts += len(g.conts)
        if S == 0 and all(len(g.conts) == 1 for g in batch):
            # one sequence per row from position 0, right-padded: the causal kernel is exact for every real
            # token (padding only follows it) and, unlike an explicit 4-D mask, takes SDPA's fast causal path
            mask = pos = None
        else:
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            visible = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])  # [b, query, key]
            mask = (causal & visible)[:, None]
            if S:
                mask = torch.cat([torch.ones(len(batch), 1, T, S, dtype=torch.bool), mask], dim=-1)
        scores, _ = self._continuation_scores(ids, pos, mask, keep, self.new_cache(shared, len(batch)),
                                              flat, targets, owner, n_conts)
        out, k = [], 0
        for g in batch:
            out.append(scores[k:k + len(g.conts)])
            k += len(g.conts)
        return out

    def _continuation_scores(self, ids, pos, mask, keep, cache, flat, targets, owner, n: int, greedy_rows=None
                             ) -> tuple[list[tuple[float, bool]], torch.Tensor | None]:
        """`_token_scores` summed per continuation (`owner[i]`: the continuation of scored token i, 0..n-1):
        [(loglikelihood, is_greedy)] for each, and the argmax at `greedy_rows` (None without)."""
        token_lp, hit, greedy = self._token_scores(ids, pos, mask, keep, cache, torch.tensor(flat),
                                                   torch.tensor(targets), greedy_rows=greedy_rows)
        owner_t = torch.tensor(owner, device=token_lp.device)
        ll = torch.zeros(n, device=token_lp.device).index_add_(0, owner_t, token_lp).tolist()
        misses = torch.zeros(n, device=token_lp.device).index_add_(0, owner_t, (~hit).float())
        return [(v, bool(m)) for v, m in zip(ll, (misses == 0).tolist())], greedy

    def _token_scores(self, ids, pos, mask, keep, cache, flat, targets, greedy_rows=None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per scored token: float32 log-probability of `targets[i]` at kept row `flat[i]`, and whether it is the
        argmax there; with `greedy_rows`, the argmax of the logits at those kept rows (a generation's next token).
        The vocabulary is projected and log-softmaxed a chunk of kept rows at a time (plain heads project from the
        hidden states), never as one [n_kept, vocab] float32 tensor."""
        hidden, head = self._kept_hidden(ids, pos, mask, keep, cache)
        flat, targets = flat.to(hidden.device), targets.to(hidden.device)
        token_lp = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        hit = torch.empty(len(targets), dtype=torch.bool, device=hidden.device)
        greedy = None
        if greedy_rows is not None:
            greedy_rows = greedy_rows.to(hidden.device)
            greedy = torch.empty(len(greedy_rows), dtype=torch.long, device=hidden.device)
        chunk = auto_chunk(head, hidden.shape[-1])
        with self._compute():
            for lo in range(0, hidden.shape[0], chunk):
                logits = head(hidden[lo:lo + chunk])
                if greedy is not None:
                    at = ((greedy_rows >= lo) & (greedy_rows < lo + chunk)).nonzero().squeeze(1)
                    greedy[at] = logits[greedy_rows[at] - lo].argmax(dim=-1)
                logp = torch.log_softmax(logits.float(), dim=-1)  # HFLM: log_softmax, then
                sel = ((flat >= lo) & (flat < lo + chunk)).nonzero().squeeze(1)  # gather and argmax of it
                rows, tgt = flat[sel] - lo, targets[sel]
                token_lp[sel] = logp[rows, tgt]
                hit[sel] = logp.argmax(dim=-1)[rows] == tgt
        return token_lp, hit, greedy

    def _kept_hidden(self, ids, pos, mask, keep, cache) -> tuple[torch.Tensor, torch.nn.Module]:
        """(rows, head) with head(rows) = the logits at the kept positions: the decoder's hidden states there and
        the output embedding for plain heads, else the model's own logits and an identity."""
        if self._plain_head:
            return self.forward(ids, pos, mask, keep, cache, project=False), self.model.get_output_embeddings()
        return self.forward(ids, pos, mask, keep, cache), torch.nn.Identity()

    def new_cache(self, shared: tuple[int, ...], batch: int):
        """A KV cache holding `shared` for `batch` rows (from the prefix store), or None when nothing is shared."""
        if not shared:
            return None
        return expanded_cache(self.prefix_store.get(tuple(shared), self._prefix_kv), batch)

    def _prefix_kv(self, prefix: tuple[int, ...]):
        from transformers import DynamicCache

        ids = torch.tensor([prefix])
        cache = DynamicCache()
        self.forward(ids, None, None, None, cache, project=False)  # one row, no padding: plain causal attention
        return cache_tensors(cache)

    def forward(self, ids, pos, mask, keep, cache=None, project: bool = True) -> torch.Tensor:
        """Logits (n_kept, vocab) at the kept positions, in row-major order (`project=False`: the decoder's last
        hidden states there instead, `keep=None`: nothing kept, only `cache` filled); `cache` (a DynamicCache)
        holds earlier keys/values the mask's first columns refer to, and is extended in place. `pos=None`:
        positions 0.. in every row."""
        dev = self._device
        if self._attn_impl == "eager" and mask is not None:  # eager attention adds the mask to the scores
            mask = additive_mask(mask, self._autocast or self.compute_dtype)
        kwargs = {"input_ids": ids.to(dev), "position_ids": pos.to(dev) if pos is not None else None,
                  "use_cache": cache is not None, "attention_mask": mask.to(dev) if mask is not None else None}
        if cache is not None:
            kwargs["past_key_values"] = cache
        with self._compute():
            if not project:
                hidden = self.model.get_decoder()(**kwargs).last_hidden_state
                logits = hidden[keep.to(dev)] if keep is not None else None
            elif self._keep_arg:
                logits = self.model(**kwargs, logits_to_keep=keep.to(dev)).logits
                logits = logits.reshape(-1, logits.shape[-1])
            else:
                logits = self.model(**kwargs).logits[keep.to(dev)]
        return logits

    @contextlib.contextmanager
    def _compute(self):
        """Model compute (forwards, the vocabulary scoring): inference mode, autocast to the compute dtype for a
        float32 model asked to run in bf16/fp16, and its time counted in `forward_seconds`."""
        autocast = (torch.autocast(device_type=self._device.type, dtype=self._autocast) if self._autocast
                    else contextlib.nullcontext())
        start = time.perf_counter()
        try:
            with torch.inference_mode(), autocast:
                yield
        finally:
            self.forward_seconds += time.perf_counter() - start

    # ---- data parallel --------------------------------------------------------------------------------------
    def _gather_ordered(self, local: list[tuple[int, object]], n: int) -> list:
        """(request index, result) pairs from every rank -> all n results in request order, on every rank."""
        if self.dp_size > 1:
            parts = [None] * self.dp_size
            torch.distributed.all_gather_object(parts, local, group=self.group)
            local = [pair for part in parts for pair in part]
        out = [None] * n
        for i, r in local:
            out[i] = r
        return out


def _conditioning_prefix(ctx, cont, max_length: int) -> tuple[int, ...]:
    """The prefix HFLM conditions `cont` on: its input is (ctx + cont)[-(L+1):][:-1], whose last len(cont)
    positions predict cont, so the prefix is that input minus cont[:-1]."""
    inp = (list(ctx) + list(cont))[-(max_length + 1):][:-1]
    return tuple(inp[:len(inp) - len(cont) + 1])


def _split_long(g: _Group) -> list[_Group]:
    """`g`, minus the continuations with more new tokens than the prefix: each of those gets a row of its own.
    Packing one saves running the prefix again but makes every token of the row attend through a 4-D mask over
    the whole packed row; for a short prefix (rolling windows and empty contexts share only the prefix token)
    that costs far more than it saves, and a lone continuation runs on the plain causal kernel."""
    solo = {j for j, c in enumerate(g.conts) if len(c) - 1 > len(g.prefix)}
    if not solo or len(g.conts) == 1:
        return [g]
    rest = [j for j in range(len(g.conts)) if j not in solo]
    parts = [_Group(g.prefix, [g.conts[j]], [g.members[j]]) for j in sorted(solo)]
    if rest:
        parts.append(_Group(g.prefix, [g.conts[j] for j in rest], [g.members[j] for j in rest]))
    return parts


def _shard(units: list[_Unit], rank: int, world: int) -> list[_Unit]:
    """Longest-processing-time split of batches by tokens run; identical on every rank (same requests, same
    plan). A rank's batches keep their planned order, so batches of one shared prefix stay adjacent."""
    if world <= 1:
        return list(units)
    load = [(0, r) for r in range(world)]
    mine = []
    for k in sorted(range(len(units)), key=lambda k: -units[k].cost):
        tokens, r = heapq.heappop(load)
        if r == rank:
            mine.append(k)
        heapq.heappush(load, (tokens + units[k].cost, r))
    return [units[k] for k in sorted(mine)]


def _parse_batch_size(batch_size) -> int:
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return 64  # HFLM's max_batch_size, where its auto starts: mirrored for its BOS handling (generate.py)
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        raise CkptEvalError(f"harness batch_size must be a positive integer, got {batch_size!r}") from None
    if value < 1:
        raise CkptEvalError(f"harness batch_size must be a positive integer, got {batch_size!r}")
    return value

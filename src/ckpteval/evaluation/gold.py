"""Scores of each document's gold answer: bits per byte on the gold continuation, and each task's chance accuracy.

    add_gold_scores(results, resolved.leaf_tasks, lm)            # after simple_evaluate, on every rank (fast, hf)
    add_gold_scores_from_samples(results, resolved.leaf_tasks)   # backend=subprocess: from the CLI's sample logs
    # results["results"][task]["bpb,none"], ["bpb_stderr,none"]; results["chance"][task]

Bits per byte on the gold answer (the "Signal and Noise" study's and OLMo's small-scale metric) of a document is
-sum(log2 p(gold tokens | context)) / UTF-8 bytes of the gold continuation, the continuation exactly as lm-eval
builds it; a task's `bpb` is its mean over documents, `bpb_stderr` the standard error of that mean (ddof=1):
- multiple choice: the gold choice's request, `target_delimiter + choice` (for a multiple-input task such as
  Winogrande: the shared continuation after the gold context), read from the loglikelihoods lm-eval already
  computed: no extra forward;
- loglikelihood tasks (LAMBADA-like): the request's own continuation;
- generate_until with a string target: one extra loglikelihood request per document, context = the prompt lm-eval
  built, continuation = `target_delimiter + target` as lm-eval writes the answer of a few-shot example (a list of
  targets: the first). Skipped (and logged) under a chat template or a `gen_prefix`, where lm-eval writes the
  answer differently. FastLM scores these in the generation's own prefill of the prompt (`expect_gold_scores`
  before `simple_evaluate`; `generate.prefill`), so they cost no forward of their own.
A document whose gold index is out of range, or whose continuation is empty, is left out.

Chance accuracy of a multiple-choice task = mean over its documents of 1 / number of choices (a group: over all its
documents). `harness/core` (evaluation/harness.py) centers each task's primary metric on it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
LN2 = math.log(2.0)
SCORED_TYPES = ("multiple_choice", "loglikelihood", "generate_until")


@dataclass
class GoldDoc:
    """One document: the gold continuation's log-likelihood (nats) and text, and its number of choices (MC)."""

    ll: float | None = None
    continuation: str | None = None
    choices: int | None = None

    @property
    def bpb(self) -> float | None:
        if self.ll is None or not self.continuation:
            return None
        return -self.ll / LN2 / len(self.continuation.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- gold answers


def _choices(task, doc) -> list | None:
    fn = getattr(task, "doc_to_choice", None)
    if fn is None:
        return None
    try:
        found = fn(doc)
    except Exception:  # noqa: BLE001 - a task without choices
        return None
    return list(found) if isinstance(found, (list, tuple)) else None


def gold_index(task, doc, n: int) -> int | None:
    """The gold choice as lm-eval's multiple-choice scoring finds it (an index, a choice string, or a list of
    them: the first); None when out of range."""
    try:
        gold = task.doc_to_text(doc) if getattr(task, "multiple_input", False) else task.doc_to_target(doc)
    except Exception:  # noqa: BLE001
        return None
    if isinstance(gold, (list, tuple)):
        gold = gold[0] if gold else None
    if isinstance(gold, str):
        choices = _choices(task, doc) or []
        gold = choices.index(gold) if gold in choices else None
    if isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < n:
        return gold
    return None


def target_continuation(task, doc) -> str | None:
    """A generate_until task's gold continuation: `target_delimiter + answer`, the answer as lm-eval writes a
    few-shot example's (`build_qa_turn`: choices[target] for an index, the first of a list, else the string)."""
    config = getattr(task, "config", None)
    if config is None or getattr(config, "gen_prefix", None):
        return None
    try:
        target = task.doc_to_target(doc)
    except Exception:  # noqa: BLE001
        return None
    choices = _choices(task, doc) if getattr(config, "doc_to_choice", None) else None
    if isinstance(target, int) and not isinstance(target, bool) and choices and 0 <= target < len(choices):
        target = choices[target]
    elif isinstance(target, (list, tuple)):
        target = target[0] if target else None
    if not isinstance(target, str) or not target:
        return None
    return f"{getattr(config, 'target_delimiter', ' ') or ''}{target}"


def _by_doc(instances) -> dict[Any, list]:
    out: dict[Any, list] = {}
    for inst in instances:
        out.setdefault(inst.doc_id, []).append(inst)
    for group in out.values():
        group.sort(key=lambda i: i.idx)
    return out


def _ll(resps) -> float | None:
    """The loglikelihood in a request's responses: [(ll, is_greedy)] in memory, [["ll", "False"]] from the CLI."""
    try:
        first = resps[0]
        return float(first[0] if isinstance(first, (list, tuple)) else first)
    except (IndexError, TypeError, ValueError):
        return None


def _mc_doc(task, doc, continuations: list[str], lls: list[float | None]) -> GoldDoc:
    choices = _choices(task, doc)
    n = len(choices) if choices is not None else len(continuations)
    g = gold_index(task, doc, min(n, len(continuations)))
    if g is None:
        return GoldDoc(choices=n or None)
    return GoldDoc(ll=lls[g], continuation=continuations[g], choices=n or None)


def docs_from_instances(task, chat: bool = False) -> tuple[list[GoldDoc], list[tuple[GoldDoc, Any, str]]]:
    """(documents scored from the requests lm-eval ran, generative documents still to score: (doc, the
    instance, continuation))."""
    kind = getattr(task, "OUTPUT_TYPE", None)
    docs, pending = [], []
    for _, group in sorted(_by_doc(getattr(task, "instances", None) or []).items(), key=lambda kv: kv[0]):
        doc = group[0].doc
        if kind == "multiple_choice":
            docs.append(_mc_doc(task, doc, [i.arguments[1] for i in group], [_ll(i.resps) for i in group]))
        elif kind == "loglikelihood":
            docs.append(GoldDoc(ll=_ll(group[0].resps), continuation=group[0].arguments[1]))
        elif kind == "generate_until" and not chat:
            cont = target_continuation(task, doc)
            if cont:
                gd = GoldDoc(continuation=cont)
                docs.append(gd)
                pending.append((gd, group[0], cont))
    return docs, pending


def _sample_arguments(sample: dict) -> list[tuple]:
    args = sample.get("arguments")
    if isinstance(args, dict):  # the CLI's samples_*.jsonl: {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, ...}
        return [tuple(v[f"arg_{j}"] for j in range(len(v))) for _, v in sorted(
            args.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[-1]))]
    return [tuple(a) for a in args or []]


def docs_from_samples(task, samples: list[dict]) -> list[GoldDoc]:
    """Documents scored from per-sample logs (in memory or the CLI's JSONL); generative ones are not (no model)."""
    kind = getattr(task, "OUTPUT_TYPE", None)
    seen, docs = set(), []
    for s in samples:
        if s.get("doc_id") in seen:  # one row per filter
            continue
        seen.add(s.get("doc_id"))
        args, resps = _sample_arguments(s), s.get("resps") or []
        if kind == "multiple_choice":
            docs.append(_mc_doc(task, s.get("doc"), [a[1] for a in args], [_ll(r) for r in resps]))
        elif kind == "loglikelihood" and args:
            docs.append(GoldDoc(ll=_ll(resps[0]) if resps else None, continuation=args[0][1]))
    return docs


# ---------------------------------------------------------------------------------------------- into the results


def _mean_stderr(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _record(results: dict, per_task: dict[str, list[GoldDoc]], bpb: bool) -> None:
    """bpb / bpb_stderr into results["results"][task] (and the groups, over all their documents), chance levels
    into results["chance"]."""
    res = results.setdefault("results", {})
    group_res = results.get("groups") or {}
    hib = results.setdefault("higher_is_better", {})
    chance = results.setdefault("chance", {})
    groups = results.get("group_subtasks") or {}

    def leaves(name: str, depth: int = 0) -> list[str]:
        kids = groups.get(name)
        if not kids or depth > 8:
            return [name]
        return [leaf for k in kids for leaf in leaves(k, depth + 1)]

    names = list(per_task) + [g for g in groups if g in res or g in group_res]
    for name in dict.fromkeys(names):
        docs = per_task.get(name)
        if docs is None:
            parts = leaves(name)
            if not all(p in per_task for p in parts):
                continue
            docs = [d for p in parts for d in per_task[p]]
        bits = [d.bpb for d in docs if d.bpb is not None]
        if bpb and bits:
            mean, stderr = _mean_stderr(bits)
            for entry in (res.get(name), group_res.get(name)):
                if entry is not None:
                    entry["bpb,none"] = mean
                    entry["bpb_stderr,none"] = stderr if stderr is not None else "N/A"
            hib.setdefault(name, {})["bpb"] = False
        counts = [d.choices for d in docs]
        if counts and all(counts):
            chance[name] = math.fsum(1.0 / c for c in counts) / len(counts)


def expect_gold_scores(lm, leaf_tasks: dict[str, Any], bpb: bool = True, chat: bool = False) -> None:
    """Before `simple_evaluate`: tell an LM that scores gold continuations during generation (FastLM's
    `gold_target`) which continuation `add_gold_scores` will ask for after each generate_until prompt."""
    if not hasattr(lm, "gold_target"):
        return
    lm.take_gold_scores()  # nothing left from an earlier evaluation

    def target(request) -> str | None:
        task = leaf_tasks.get(getattr(request, "task_name", None))
        if getattr(task, "OUTPUT_TYPE", None) != "generate_until":
            return None
        return target_continuation(task, request.doc)

    lm.gold_target = target if bpb and not chat else None


def add_gold_scores(results: dict | None, leaf_tasks: dict[str, Any], lm, bpb: bool = True,
                    chat: bool = False) -> None:
    """After `simple_evaluate` on an in-memory LM: score the generative tasks' gold continuations (on EVERY rank:
    FastLM shares the requests across data-parallel ranks), then, where `results` exists (rank 0), record bpb
    and chance levels."""
    per_task, pending = {}, []
    for name, task in leaf_tasks.items():
        if getattr(task, "OUTPUT_TYPE", None) not in SCORED_TYPES:
            continue
        docs, todo = docs_from_instances(task, chat=chat)
        per_task[name] = docs
        pending += todo if bpb else []
        if chat and task.OUTPUT_TYPE == "generate_until":
            log.info("bpb: %s left out: generative tasks under a chat template have no plain gold continuation", name)
    scored = lm.take_gold_scores() if hasattr(lm, "take_gold_scores") else {}  # in the generation's prefills
    if hasattr(lm, "gold_target"):
        lm.gold_target = None
    for gd, inst, cont in pending:
        if (inst.arguments[0], cont) in scored:
            gd.ll = float(scored[(inst.arguments[0], cont)][0])
    pending = [p for p in pending if p[0].ll is None]
    if pending:
        from lm_eval.api.instance import Instance

        requests = [Instance("loglikelihood", inst.doc, (inst.arguments[0], cont), 0,
                             (inst.task_name, inst.doc_id, 1)) for _, inst, cont in pending]
        scores = lm.loglikelihood(requests, disable_tqdm=True)
        for (gd, _, _), (ll, _) in zip(pending, scores):
            gd.ll = float(ll)
    if results is not None:
        _record(results, per_task, bpb)


def add_gold_scores_from_samples(results: dict, leaf_tasks: dict[str, Any], bpb: bool = True) -> None:
    """The same from a results dict's per-sample logs (backend=subprocess): multiple-choice and loglikelihood
    tasks only (the generative ones would need the model, which ran in the other process)."""
    samples = results.get("samples") or {}
    per_task = {}
    for name, task in leaf_tasks.items():
        if getattr(task, "OUTPUT_TYPE", None) in ("multiple_choice", "loglikelihood") and samples.get(name):
            per_task[name] = docs_from_samples(task, samples[name])
    if not samples:
        log.info("bpb and chance levels need the per-sample logs with harness.backend=subprocess: "
                 "harness.log_samples=true")
    _record(results, per_task, bpb)

"""lm-evaluation-harness glue: resolve tasks (offline-aware), build the LM, run it, turn results into metrics.

    resolved = resolve_tasks(cfg.harness)                    # before any model is loaded
    lm = build_lm("hf", model, tokenizer, cfg.harness, dist) # or "fast" (FastLM), falls back to "hf"
    results = run_simple_evaluate(lm, resolved, cfg.harness)
    metrics, primaries = harness_metrics(results)            # {"harness/arc_easy/acc": ..., "harness/mean_primary": ...}

Task resolution builds every requested task up front (lm-eval loads a task's dataset when it builds it), so an
unknown name, a task that would execute model-written code, or data that is not available offline fails in
seconds with one message, before a checkpoint is read. Built tasks are handed to ``simple_evaluate`` as objects,
so nothing is loaded twice. lm-eval's own index of ~14k built-in task YAMLs takes ~20 s to build; when every
requested task comes from ``harness.include_path`` the built-ins are not indexed at all; the index is kept per
process (the watcher evaluates many checkpoints with one) and cached on disk across processes (``task_index``:
a fraction of a second instead of ~15 s for every later job).

``harness.backend=subprocess`` runs the stock ``lm_eval`` CLI on an HF dir in a clean process
(`run_lm_eval_cli`); its results JSON has the same shape, so the same metric code reads it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import difflib
import fnmatch
import json
import logging
import math
import os
import subprocess
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpteval.errors import CkptEvalError
from ckpteval.fsutil import has_glob

log = logging.getLogger(__name__)

PRIMARY_PREFERENCE = ("acc_norm", "acc")  # the primary metric of a task: the first of these it reports
_CUSTOM = "its custom_dataset loader"


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise CkptEvalError("mode=harness needs lm-evaluation-harness: pip install -e '.[harness]'") from None


# ---------------------------------------------------------------------------------------------- tasks


@dataclass
class ResolvedTasks:
    """Requested tasks, built (datasets loaded) and checked; `objects` go straight to simple_evaluate."""

    manager: Any  # lm_eval.tasks.TaskManager
    names: list[str]  # requested names after glob expansion (tasks, groups, tags or YAML paths)
    objects: list  # top-level lm_eval Task / Group objects
    leaf_tasks: dict[str, Any]  # every task that will run, by name


_MANAGERS: collections.OrderedDict[tuple, Any] = collections.OrderedDict()  # this process's TaskManagers
_MANAGERS_KEEP = 4  # (include path, with the built-ins?) pairs kept


def task_manager(include_path: str | None, include_defaults: bool = True, cache_dir: str | None = None):
    """lm-eval's TaskManager (its index of task YAMLs), once per process and include path; its index is read
    from `cache_dir` while the task files are unchanged (`task_index`), built (~15 s with the built-ins) else."""
    from ckpteval.evaluation.task_index import cached_task_manager

    key = (include_path, include_defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = cached_task_manager(include_path, include_defaults, Path(cache_dir) if cache_dir else None)
        while len(_MANAGERS) > _MANAGERS_KEEP:
            _MANAGERS.popitem(last=False)
    _MANAGERS.move_to_end(key)
    return _MANAGERS[key]


def _include_path(hcfg) -> str | None:
    if not hcfg.include_path:
        return None
    path = Path(str(hcfg.include_path)).expanduser()
    if not path.exists():
        raise CkptEvalError(f"harness.include_path={hcfg.include_path} does not exist: point it at a dir (or YAML "
                            f"file) of lm-eval task configs")
    return str(path.resolve())


def _known(manager, spec: str) -> bool:
    if spec in manager.task_index:
        return True
    if has_glob(spec):
        return bool(fnmatch.filter(manager.all_tasks, spec))
    return spec.endswith((".yaml", ".yml")) and Path(spec).is_file()


def _manager_for(specs: list[str], include: str | None, cache_dir: str | None = None):
    """The include-path-only index when it knows every spec (the built-ins are not indexed), else the full one."""
    if include is not None:
        own = task_manager(include, False, cache_dir)
        if all(_known(own, s) for s in specs):
            return own
    return task_manager(include, True, cache_dir)


def _expand(manager, specs: list[str]) -> list[str]:
    names: list[str] = []
    unknown: list[str] = []
    for spec in specs:
        if spec in manager.task_index or (spec.endswith((".yaml", ".yml")) and Path(spec).is_file()):
            names.append(spec)
        elif has_glob(spec) and fnmatch.filter(manager.all_tasks, spec):
            names += sorted(fnmatch.filter(manager.all_tasks, spec))
        else:
            unknown.append(spec)
    if unknown:
        parts = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            parts.append(f"{name!r}" + (f" (did you mean: {', '.join(close)}?)" if close else " (no close match)"))
        raise CkptEvalError(f"unknown lm-eval task {'; '.join(parts)}: list the known ones with `lm_eval ls tasks`; "
                            "for tasks of your own pass harness.include_path=DIR (a dir of task YAMLs)")
    return list(dict.fromkeys(names))


def _leaf_entries(manager, name: str, depth: int = 0) -> list:
    """Index entries of the concrete tasks behind a task, group or tag name (for messages and checks)."""
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    if entry is None or depth > 8:
        return []
    if entry.kind in (Kind.TASK, Kind.PY_TASK):
        return [entry]
    children: list[str] = []
    if entry.kind == Kind.GROUP:
        for child in (entry.cfg or {}).get("task", []) or []:
            children.append(child if isinstance(child, str) else (child or {}).get("task", ""))
    elif entry.kind == Kind.TAG:
        children = [n for n, e in manager.task_index.items() if name in (e.tags or ())]
    out = []
    for child in children:
        if isinstance(child, str) and child:
            out += _leaf_entries(manager, child, depth + 1)
    return out


_NOTICED: set[str] = set()  # task YAMLs already named in this process's log


def _notice_python_imports(manager, names: list[str], include_path: str | None) -> None:
    """Name, once per file and before it runs, each task YAML from harness.include_path that imports Python
    (`!function`): loading the task executes that Python file, so the user should know which ones do."""
    if not include_path:
        return
    root = Path(include_path).resolve()
    for entry in {e.yaml_path: e for n in names for e in _leaf_entries(manager, n) if e.yaml_path}.values():
        path = Path(entry.yaml_path).resolve()
        if str(path) in _NOTICED or not path.is_relative_to(root if root.is_dir() else root.parent):
            continue
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if "!function" in text:
            _NOTICED.add(str(path))
            funcs = sorted({line.split("!function", 1)[1].strip() for line in text.splitlines() if "!function" in line})
            log.warning("task %s (%s) imports Python from harness.include_path: %s runs when it loads", entry.name,
                        path, ", ".join(funcs))


def _refuse_code_tasks(names: list[str], allow: bool) -> None:
    if names and not allow:
        raise CkptEvalError(f"task(s) {', '.join(sorted(set(names)))} execute model-written code: they stay refused "
                            "unless harness.allow_code_execution=true (run them only in a sandbox you trust)")


def _dataset_of(entry) -> str:
    cfg = entry.cfg or {}
    path, name = cfg.get("dataset_path"), cfg.get("dataset_name")
    if not path:
        return _CUSTOM
    return f"{path}" + (f" (config {name})" if name else "")


def _load_error(spec: str, exc: Exception, manager) -> CkptEvalError:
    """One message naming the task, the dataset it needs, and how to provide it offline."""
    text = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    leaves = _leaf_entries(manager, spec)
    datasets = list(dict.fromkeys(_dataset_of(e) for e in leaves))
    needs = ", ".join(datasets[:4]) + (f" and {len(datasets) - 4} more" if len(datasets) > 4 else "")
    missing = isinstance(exc, (ConnectionError, FileNotFoundError, TimeoutError)) or any(
        s in str(exc) for s in ("offline", "Offline", "Couldn't reach", "doesn't exist on the Hub", "not find"))
    if not missing:
        hub = [d for d in datasets if d != _CUSTOM]
        return CkptEvalError(f"lm-eval task {spec} could not be built ({text}): check its YAML"
                             + (f" (dataset {', '.join(hub[:4])})" if hub else ""))
    first = next((e.cfg for e in leaves if (e.cfg or {}).get("dataset_path")), None) or {}
    load = (f"datasets.load_dataset({first['dataset_path']!r}"
            + (f", {first['dataset_name']!r}" if first.get("dataset_name") else "") + ")") if first else None
    how = (f"cache it where there is network (python -c \"import datasets; {load}\") and copy that HF cache "
           "here (HF_HOME / HF_DATASETS_CACHE), " if load else "")
    return CkptEvalError(
        f"lm-eval task {spec} needs the dataset {needs or '?'}, which is not available offline ({text}): "
        f"{how}or write a task YAML that reads local files (dataset_path: json + dataset_kwargs.data_files, or "
        f"custom_dataset) and pass harness.include_path=DIR harness.tasks=[YOUR_TASK]")


def _top_level(loaded: dict) -> list:
    """The Task/Group objects that are not inside another group (what a spec asked for)."""
    children = {c for kids in (loaded.get("group_map") or {}).values() for c in kids}
    groups = [g for name, g in (loaded.get("groups") or {}).items() if name not in children]
    in_groups = {t for g in (loaded.get("groups") or {}).values() for t in
                 (x.task_name for x in g.get_all_tasks())}
    tasks = [t for name, t in loaded["tasks"].items() if name not in in_groups]
    return groups + tasks


_RESOLVED: "collections.OrderedDict[tuple, ResolvedTasks]" = collections.OrderedDict()
_RESOLVED_KEEP = 4  # task sets kept per process (a watcher has a light and a heavy suite)


def resolve_tasks(hcfg, index_cache_dir: Path | str | None = None) -> ResolvedTasks:
    """Find, check and build every task of `hcfg.tasks`; raises CkptEvalError before any model is loaded.

    Kept per process for the same tasks and settings (`harness.request_cache`): a scan or the watcher loads
    each task's documents once, not once per checkpoint. lm-eval's task index is cached in `index_cache_dir`
    across processes (`task_index`); None: indexed in this process."""
    key = (tuple(str(t) for t in (hcfg.tasks or [])), _include_path(hcfg), bool(hcfg.allow_code_execution),
           hcfg.num_fewshot, hcfg.gen_kwargs, hcfg.limit, bool(hcfg.apply_chat_template), int(hcfg.seed))
    reuse = bool(getattr(hcfg, "request_cache", True))
    if reuse and key in _RESOLVED:
        _RESOLVED.move_to_end(key)
        return _RESOLVED[key]
    resolved = _resolve_tasks(hcfg, str(index_cache_dir) if index_cache_dir else None)
    if reuse:
        _RESOLVED[key] = resolved
        while len(_RESOLVED) > _RESOLVED_KEEP:
            _RESOLVED.popitem(last=False)
    return resolved


def _resolve_tasks(hcfg, index_cache_dir: str | None) -> ResolvedTasks:
    require_lm_eval()
    specs = [str(t) for t in (hcfg.tasks or [])]
    if not specs:
        raise CkptEvalError("harness.tasks is empty: name at least one task (harness.tasks=[arc_easy]) or pick a "
                            "suite (harness=default)")
    manager = _manager_for(specs, _include_path(hcfg), index_cache_dir)
    names = _expand(manager, specs)
    allow = bool(hcfg.allow_code_execution)
    _refuse_code_tasks([e.name for n in names for e in _leaf_entries(manager, n) if (e.cfg or {}).get("unsafe_code")],
                       allow)
    _notice_python_imports(manager, names, _include_path(hcfg))
    objects: list = []
    leaf: dict[str, Any] = {}
    for name in names:
        try:
            loaded = manager.load([name])
        except CkptEvalError:
            raise
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for missing data; one message for all
            log.warning("loading task %s failed", name, exc_info=True)  # the traceback, for a bug report
            raise _load_error(name, exc, manager) from None
        objects += _top_level(loaded)
        leaf.update(loaded["tasks"])
    _refuse_code_tasks([n for n, t in leaf.items() if getattr(t, "UNSAFE_CODE", False)], allow)
    return ResolvedTasks(manager=manager, names=names, objects=objects, leaf_tasks=leaf)


# ---------------------------------------------------------------------------------------------- LM


def build_lm(backend: str, model, tokenizer, harness_cfg, dist):
    """The lm-eval LM for an in-memory model: `fast` (our FastLM, the default) or `hf` (lm-eval's HFLM)."""
    if backend not in ("hf", "fast"):
        raise CkptEvalError(f"harness.backend={backend} does not wrap an in-memory model: use hf or fast "
                            f"(subprocess runs the lm_eval CLI on a converted dir)")
    from lm_eval.models.utils import resolve_max_length

    from ckpteval.checkpoint.formats import _common

    # a config saying max_position_embeddings -1 (OLMo-core's HF export: no limit) would be read as a max_length
    # of -1: lm-eval's own fallback (the tokenizer's model_max_length, else 2048) applies instead
    unlimited = _common.int_or_none(getattr(model.config, "max_position_embeddings", None)) is not None and \
        _common.position_limit(model.config) is None
    max_length = resolve_max_length(None, tokenizer) if unlimited else None
    if backend == "fast":
        from ckpteval.evaluation.fast_lm import FastLM

        kwargs = {}
        if dist is not None and dist.dp_size > 1:
            kwargs = {"rank": dist.dp_rank, "world_size": dist.dp_size, "group": dist.dp_group}
        kwargs["prefix_cache_tokens"] = int(getattr(harness_cfg, "prefix_cache_tokens", 8192))
        kwargs["memory_budget_gb"] = getattr(harness_cfg, "memory_budget_gb", None)
        return FastLM(model, tokenizer, batch_size=batch_size_arg(harness_cfg.batch_size),
                      device=dist.device if dist else None, dtype=harness_cfg.dtype, max_length=max_length, **kwargs)
    from lm_eval.models.huggingface import HFLM

    # simple_evaluate ignores its batch_size for an LM object: HFLM's own batch_size is the one that counts.
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size_arg(harness_cfg.batch_size),
                trust_remote_code=bool(harness_cfg.trust_remote_code), max_length=max_length)


def batch_size_arg(value) -> int | str:
    """harness.batch_size as lm-eval takes it: an int, or "auto" (HFLM and the CLI: lm-eval's own probe)."""
    from ckpteval.evaluation.auto_batch import AUTO, is_auto

    return AUTO if is_auto(value) else int(value)


def _limit(value):
    if value is None:
        return None
    value = float(value)
    return int(value) if value >= 1 and value.is_integer() else value


def run_simple_evaluate(lm, resolved: ResolvedTasks, hcfg, request_cache_dir: Path | None = None) -> dict | None:
    """lm_eval.simple_evaluate on the built tasks; None on ranks that do not aggregate. With
    `harness.request_cache`, each task's requests are built once per process and tokenizer (and read from
    `request_cache_dir` in later processes): see `request_cache`."""
    from lm_eval import simple_evaluate

    seed = int(hcfg.seed)
    reuse = contextlib.nullcontext()
    if getattr(hcfg, "request_cache", False):
        from lm_eval import __version__ as lm_eval_version

        from ckpteval.evaluation.request_cache import reuse_built_requests, tokenizer_fingerprint

        tokenizer = getattr(lm, "tokenizer", None)
        base = {"lm_eval": lm_eval_version, "seed": seed, "num_fewshot": hcfg.num_fewshot, "limit": _limit(hcfg.limit),
                "gen_kwargs": hcfg.gen_kwargs, "chat": bool(hcfg.apply_chat_template),
                "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None}
        reuse = reuse_built_requests(resolved.leaf_tasks, base, request_cache_dir)
    from ckpteval.evaluation.gold import add_gold_scores, expect_gold_scores

    bpb, chat = bool(getattr(hcfg, "bpb", True)), bool(hcfg.apply_chat_template)
    expect_gold_scores(lm, resolved.leaf_tasks, bpb=bpb, chat=chat)
    with reuse, env_info_once_per_process():
        results = _simple_evaluate(simple_evaluate, lm, resolved, hcfg, seed)
    add_gold_scores(results, resolved.leaf_tasks, lm, bpb=bpb, chat=chat)  # every rank: FastLM shares the requests
    return results


_ENV_INFO: dict[tuple[str, str], Future] = {}  # (what, working dir) -> lm-eval's answer, for this process


@contextlib.contextmanager
def env_info_once_per_process():
    """While the block runs, lm-eval's description of the environment in every results dict (`git_hash`, and
    `add_env_info`: torch's `collect_env`, about ten subprocesses, plus the commit above the working dir) is
    computed once per process and working dir and reused: ~0.5 s per checkpoint in a scan or the watcher,
    for an answer that is the same for every checkpoint (the code and environment this process runs). The
    first computation starts in a background thread when the block starts (lm-eval asks at the end of the
    evaluation): its ~0.5-1.5 s, mostly waiting on subprocesses, pass while the model runs."""
    from lm_eval import evaluator

    add_env_info, git_hash = evaluator.add_env_info, evaluator.get_git_commit_hash

    def env() -> dict:
        found: dict = {}
        add_env_info(found)
        return found

    def start(what: str, compute) -> Future:
        key = (what, os.getcwd())
        if key not in _ENV_INFO:
            future: Future = Future()

            def run():
                try:
                    future.set_result(compute())
                except BaseException as exc:  # noqa: BLE001 - raised where lm-eval asks for the answer
                    future.set_exception(exc)

            threading.Thread(target=run, name=f"lm-eval {what} info", daemon=True).start()
            _ENV_INFO[key] = future
        return _ENV_INFO[key]

    computing = {"env": start("env", env), "git": start("git", git_hash)}

    def cached_add_env_info(storage: dict) -> None:
        storage.update(copy.deepcopy(computing["env"].result()))

    evaluator.add_env_info = cached_add_env_info
    evaluator.get_git_commit_hash = lambda: copy.deepcopy(computing["git"].result())
    try:
        yield
    finally:
        evaluator.add_env_info, evaluator.get_git_commit_hash = add_env_info, git_hash


def _simple_evaluate(simple_evaluate, lm, resolved: ResolvedTasks, hcfg, seed: int) -> dict | None:
    return simple_evaluate(
        model=lm, tasks=list(resolved.objects), task_manager=resolved.manager, num_fewshot=hcfg.num_fewshot,
        batch_size=batch_size_arg(hcfg.batch_size), limit=_limit(hcfg.limit), log_samples=bool(hcfg.log_samples),
        gen_kwargs=hcfg.gen_kwargs or None, apply_chat_template=bool(hcfg.apply_chat_template),
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        confirm_run_unsafe_code=bool(hcfg.allow_code_execution),
    )


# ---------------------------------------------------------------------------------------------- subprocess


def lm_eval_cli_command(model_dir: Path, hcfg, device: str, output_path: Path, tokenizer: Path | None = None,
                        tasks: list[str] | None = None) -> list[str]:
    """The stock `lm_eval` command line equivalent to our settings."""
    model_args = f"pretrained={model_dir},dtype={hcfg.dtype}"
    if tokenizer is not None:
        model_args += f",tokenizer={tokenizer}"
    if hcfg.trust_remote_code:
        model_args += ",trust_remote_code=True"
    seed = int(hcfg.seed)
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", model_args,
           "--tasks", ",".join(tasks if tasks is not None else [str(t) for t in hcfg.tasks]),
           "--batch_size", str(batch_size_arg(hcfg.batch_size)), "--device", str(device),
           "--output_path", str(output_path), "--seed", f"{seed},{seed},{seed},{seed}"]
    if hcfg.include_path:
        cmd += ["--include_path", str(Path(str(hcfg.include_path)).expanduser().resolve())]
    if hcfg.num_fewshot is not None:
        cmd += ["--num_fewshot", str(int(hcfg.num_fewshot))]
    if hcfg.limit is not None:
        cmd += ["--limit", str(_limit(hcfg.limit))]
    if hcfg.log_samples:
        cmd += ["--log_samples"]
    if hcfg.gen_kwargs:
        cmd += ["--gen_kwargs", str(hcfg.gen_kwargs)]
    if hcfg.apply_chat_template:
        cmd += ["--apply_chat_template"]
    if hcfg.allow_code_execution:
        cmd += ["--confirm_run_unsafe_code"]
    if hcfg.trust_remote_code:
        cmd += ["--trust_remote_code"]
    return cmd


def run_lm_eval_cli(cmd: list[str], output_path: Path, env: dict | None = None) -> dict:
    """Run the lm_eval CLI in a clean process (its stderr streams through); its results JSON, samples attached."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    log.info("running: %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=30)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)

    def pump():
        for line in proc.stderr:
            tail.append(line.rstrip())
            sys.stderr.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    proc.stdout.read()  # the CLI's table; ours is printed from the results JSON
    proc.wait()
    reader.join()
    if proc.returncode != 0:
        raise CkptEvalError(f"the lm_eval CLI failed (exit {proc.returncode}): {' | '.join(list(tail)[-4:])[:800]}; "
                            f"command: {' '.join(cmd)}")
    found = sorted(output_path.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise CkptEvalError(f"the lm_eval CLI wrote no results_*.json under {output_path}")
    results = json.loads(found[-1].read_text())
    samples: dict[str, list] = {}
    for f in found[-1].parent.glob("samples_*.jsonl"):
        task = f.name[len("samples_"):].rsplit("_", 1)[0]
        with open(f, encoding="utf-8") as fh:
            samples[task] = [json.loads(line) for line in fh if line.strip()]
    if samples:
        results["samples"] = samples
    return results


# ---------------------------------------------------------------------------------------------- results


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _metric_entries(res: dict) -> list[tuple[str, str, float]]:
    """(metric, filter, value) of one results entry, stderr excluded, in lm-eval's order."""
    out = []
    for key, value in res.items():
        if "," not in key or not _number(value):
            continue
        metric, filt = key.split(",", 1)
        if not metric.endswith("_stderr"):
            out.append((metric, filt, float(value)))
    return out


def select_primary_metric(task: str, res: dict, results: dict) -> tuple[str, str, float] | None:
    """acc_norm, else acc, else the task's first metric (its config's metric_list order): (metric, filter, value)."""
    entries = _metric_entries(res)
    if not entries:
        return None
    for wanted in PRIMARY_PREFERENCE:
        for metric, filt, value in entries:
            if metric == wanted and filt == "none":
                return metric, filt, value
        for metric, filt, value in entries:
            if metric == wanted:
                return metric, filt, value
    metric_list = ((results.get("configs") or {}).get(task) or {}).get("metric_list") or []
    first = next((m.get("metric") for m in metric_list if isinstance(m, dict) and isinstance(m.get("metric"), str)),
                 None)
    for metric, filt, value in entries:
        if metric == first:
            return metric, filt, value
    return entries[0]


def _metric_name(metric: str, filt: str) -> str:
    return metric if filt == "none" else f"{metric}_{filt}"


def top_level_entries(results: dict) -> list[str]:
    """Result entries not nested in a group: the tasks and groups a user asked for."""
    children = {c for kids in (results.get("group_subtasks") or {}).values() for c in kids}
    return [name for name in results.get("results", {}) if name not in children]


def harness_metrics(results: dict) -> tuple[dict[str, float], dict[str, str]]:
    """Flat metrics (`harness/{task}/{metric}` and its `_stderr`, `.../primary`, `.../n_samples`,
    `harness/mean_primary`, `harness/core`) and each task's primary metric name.

    `mean_primary` averages the primary metric of the top-level tasks/groups whose primary is higher-is-better
    (accuracies); perplexity-type primaries (loglikelihood_rolling tasks) are left out of the mean. `core` is the
    centered aggregate (`core_score`). Bits per byte on the gold answers (`harness/{task}/bpb`) come with the
    results (evaluation/gold.py).
    """
    metrics: dict[str, float] = {}
    primaries: dict[str, str] = {}
    hib = results.get("higher_is_better") or {}
    entries = {**(results.get("results") or {}), **(results.get("groups") or {})}
    for task, res in entries.items():
        for key, value in res.items():
            if "," not in key or not _number(value):
                continue
            metric, filt = key.split(",", 1)
            metrics[f"harness/{task}/{_metric_name(metric, filt)}"] = float(value)
        n = ((results.get("n-samples") or {}).get(task) or {}).get("effective")
        if _number(n):
            metrics[f"harness/{task}/n_samples"] = float(n)
        primary = select_primary_metric(task, res, results)
        if primary is not None:
            primaries[task] = _metric_name(primary[0], primary[1])
            metrics[f"harness/{task}/primary"] = primary[2]
    means = []
    for task in top_level_entries(results):
        primary = select_primary_metric(task, entries.get(task, {}), results)
        if primary is not None and (hib.get(task) or {}).get(primary[0]) is True:
            means.append(primary[2])
    if means:
        metrics["harness/mean_primary"] = sum(means) / len(means)
    core, used, left_out = core_score(results)
    if core is not None:
        metrics["harness/core"] = core
    if left_out:
        log.info("harness/core: %s left out (no chance level: not multiple choice and no metadata.random_baseline "
                 "in the task config)%s", ", ".join(left_out), "" if used else "; no task had one")
    return metrics, primaries


def chance_level(task: str, results: dict) -> float | None:
    """A task's chance accuracy: `metadata.random_baseline` in its config, else the mean over its documents of
    1 / number of choices (multiple choice, recorded by evaluation/gold.py under results["chance"])."""
    meta = ((results.get("configs") or {}).get(task) or {}).get("metadata") or {}
    stated = meta.get("random_baseline") if isinstance(meta, dict) else None
    if _number(stated):
        return float(stated)
    found = (results.get("chance") or {}).get(task)
    return float(found) if _number(found) else None


def core_score(results: dict) -> tuple[float | None, list[str], list[str]]:
    """DCLM's CORE: the mean over top-level tasks of (primary - random) / (1 - random), random = the task's chance
    accuracy (`chance_level`). Tasks whose primary is not higher-is-better or that have no chance level below 1
    are left out. Returns (core or None, tasks used, tasks left out)."""
    hib = results.get("higher_is_better") or {}
    entries = {**(results.get("results") or {}), **(results.get("groups") or {})}
    centered, used, left_out = [], [], []
    for task in top_level_entries(results):
        primary = select_primary_metric(task, entries.get(task, {}), results)
        random = chance_level(task, results)
        if primary is None or (hib.get(task) or {}).get(primary[0]) is not True or random is None or random >= 1:
            left_out.append(task)
            continue
        centered.append((primary[2] - random) / (1.0 - random))
        used.append(task)
    return (sum(centered) / len(centered) if centered else None), used, left_out


def results_table(results: dict) -> str:
    """The job's printed table: the rows and cells of lm-eval's `make_table` (tasks under their groups, a metric
    per row with its direction and stderr), then the groups'. Rendered here: `make_table` also fills a LaTeX
    writer it never prints and infers every cell's type, ~30-50 ms per job, most of a scan job's printing. The
    one difference: numbers are shown as lm-eval formats them (4 decimals), not re-padded per column."""
    text = _table(results, "results")
    if results.get("groups"):
        text += "\n" + _table(results, "groups")
    return text


def _table(results: dict, column: str) -> str:
    entries = results.get(column) or {}
    groups = results.get("group_subtasks") or {}
    depth: dict[str, int] = {}
    order: list[str] = []

    def visit(name: str, level: int) -> None:
        depth[name] = level
        if name in entries:
            order.append(name)
        for child in sorted(groups.get(name, [])):
            visit(child, level + 1)

    children = {c for subtasks in groups.values() for c in subtasks}
    for name in sorted(groups):
        if name not in children:
            visit(name, 0)
    order += sorted(k for k in entries if k not in depth)
    header = ["Groups" if column == "groups" else "Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "",
              "Stderr"]
    rows = []
    for key in order:
        entry = dict(entries[key])
        name = str(entry.pop("alias", key))
        name = " " * depth.get(key, 0) + "- " + name if depth.get(key, 0) else name
        version = results.get("versions", {}).get(key, "    N/A")
        version = str(int(version) if isinstance(version, float) and version.is_integer() else version)
        shots = str(results.get("n-shot", {}).get(key, " "))
        hib = results.get("higher_is_better", {}).get(key, {})
        for metric_filter, value in sorted((k, v) for k, v in entry.items()
                                           if k not in ("name", "sample_len", "sample_count")):
            metric, _, filt = metric_filter.partition(",")
            if metric.endswith("_stderr"):
                continue
            arrow = {True: "\u2191", False: "\u2193"}.get(hib.get(metric), "")
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            se = entry.get(f"{metric}_stderr,{filt}")
            se_text = "" if se is None else "   N/A" if se == "N/A" else f"{se:.4f}"
            rows.append([name, version, filt, shots, metric, arrow, shown, "\u00b1" if se is not None else "", se_text])
            name = version = ""
    widths = [max([3, len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]
    right = [bool(cells) and all(_numeric_text(c) for c in cells)  # a column of numbers is right-aligned
             for cells in ([r[i] for r in rows if r[i].strip()] for i in range(len(header)))]

    def line(cells: list[str]) -> str:  # a number right-aligned, text left-aligned
        return "|" + "|".join(c.rjust(w) if _numeric_text(c) else c.ljust(w) for c, w in zip(cells, widths)) + "|"

    def centered(text: str, width: int) -> str:
        left = (width - len(text)) // 2
        return " " * left + text + " " * (width - len(text) - left)

    rule = "|" + "|".join("-" * (w - 1) + ":" if r else "-" * w for w, r in zip(widths, right)) + "|"
    return "\n".join([line([centered(h, w) for h, w in zip(header, widths)]), rule, *map(line, rows)]) + "\n"


def _numeric_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def save_results(results: dict, out_dir: Path) -> Path:
    """lm-eval's results JSON (config, versions, n-samples, task hashes, stderr) and per-task sample logs."""
    from lm_eval.utils import handle_non_serializable, hash_string

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in results.items() if k != "samples"}
    if "task_hashes" not in body:  # what lm_eval's CLI (EvaluationTracker) records: one hash of each task's samples
        body["task_hashes"] = {
            task: hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in rows))
            for task, rows in (results.get("samples") or {}).items()}
    (out_dir / "results.json").write_text(json.dumps(body, indent=2, default=handle_non_serializable,
                                                     ensure_ascii=False) + "\n")
    for task, rows in (results.get("samples") or {}).items():
        with open(out_dir / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n" for row in rows)
    return out_dir

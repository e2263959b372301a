"""lm-eval's task index cached on disk (`ckpteval.evaluation.task_index`): the same index, names, configs, task
objects and metrics as a fresh `TaskManager` (lm-eval's own, the reference), rebuilt exactly when a task file,
an included file or lm-eval's version changes, a corrupt cache rebuilt with a warning, concurrent writers safe,
and nothing executed by reading it.

The fast tests index a small include path only (`include_defaults=False`); the slow one compares the full index
(lm-eval's ~14k built-in YAMLs, ~15 s to build once) with a fresh `TaskManager()`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path

import pytest

from ckpteval.tasks import TASKS_DIR

GROUP = """group: idx_group
task:
  - ckpteval_mc
  - idx_tagged
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
metadata:
  version: 1.0
"""
TAGGED = """include: _idx_template_yaml
task: idx_tagged
tag: [idx_tag]
"""
TEMPLATE = """custom_dataset: !function ckpteval_offline_data.load_mc
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
doc_to_text: "Q: {{question}}\\nA:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""
OUTSIDE = """include: {outside}
task: idx_outside
tag: [idx_tag]
"""


@pytest.fixture
def task_dir(tmp_path):
    """ckpteval/tasks plus a group, a tagged task including a `_yaml` template, and a task including a file from
    outside the include path."""
    root = tmp_path / "tasks"
    shutil.copytree(TASKS_DIR, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "idx_group.yaml").write_text(GROUP)
    (root / "idx_tagged.yaml").write_text(TAGGED)
    (root / "_idx_template_yaml").write_text(TEMPLATE)
    outside = tmp_path / "shared" / "outside_template.yaml"
    outside.parent.mkdir()
    outside.write_text(TEMPLATE.replace("Q:", "Question:"))
    for name in ("ckpteval_offline_data.py", "ckpteval_mc.jsonl"):  # `!function` resolves beside the template
        shutil.copy(TASKS_DIR / name, outside.parent / name)
    (root / "sub").mkdir()
    (root / "sub" / "idx_outside.yaml").write_text(OUTSIDE.format(outside=outside))
    return root


@pytest.fixture
def builds(monkeypatch):
    """Roots lm-eval's TaskIndex.build indexes, one list per build (a cache hit builds nothing)."""
    from lm_eval.tasks._index import TaskIndex

    seen: list[list[str]] = []
    original = TaskIndex.build

    def build(paths, **kw):
        paths = list(paths)
        if paths:
            seen.append([str(p) for p in paths])
        return original(paths, **kw)

    monkeypatch.setattr(TaskIndex, "build", staticmethod(build))
    return seen


def _manager(task_dir: Path, cache: Path, defaults: bool = False):
    from ckpteval.evaluation.task_index import cached_task_manager

    return cached_task_manager(str(task_dir), defaults, cache)


def _same_index(fresh, cached, cfg_names=None) -> None:
    """Names and order, kinds, files and tags of every entry, the name lists, and the parsed YAML of `cfg_names`
    (default: every entry)."""
    assert list(fresh.task_index) == list(cached.task_index)
    for attr in ("all_tasks", "all_groups", "all_subtasks", "all_tags"):
        assert getattr(fresh, attr) == getattr(cached, attr), attr
    for name, entry in fresh.task_index.items():
        other = cached.task_index[name]
        assert (entry.name, entry.kind, entry.yaml_path, entry.tags) == (other.name, other.kind, other.yaml_path,
                                                                          other.tags), name
    for name in fresh.task_index if cfg_names is None else cfg_names:
        assert fresh.task_index[name].cfg == cached.task_index[name].cfg, name
    assert cached.include_path == fresh.include_path


def _built(manager, names: list[str]) -> dict:
    """What `TaskManager.load` builds: each task's full config (as lm-eval dumps it) and documents, the groups."""
    loaded = manager.load(names)
    tasks = {name: (json.dumps(t.dump_config(), sort_keys=True, default=str), list(t.eval_docs))
             for name, t in loaded["tasks"].items()}
    return {"tasks": tasks, "group_map": loaded["group_map"], "groups": sorted(loaded["groups"])}


def test_cached_index_equals_a_fresh_task_manager(task_dir, tmp_path, builds):
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Entry

    first = _manager(task_dir, tmp_path / "cache")  # nothing cached: lm-eval indexes, the index is stored
    assert type(first) is TaskManager and len(builds) == 1
    assert all(type(e) is Entry for e in first.task_index.values())
    cached = _manager(task_dir, tmp_path / "cache")
    assert len(builds) == 1, "a cache hit indexed the YAMLs again"
    fresh = TaskManager(include_path=str(task_dir), include_defaults=False)
    assert {"idx_group", "idx_tagged", "idx_tag", "idx_outside", "ckpteval_mc"} <= set(fresh.task_index)
    _same_index(fresh, cached)
    for names, expected in ((["idx_group", "idx_outside", "ckpteval_rolling"],
                             {"ckpteval_mc", "idx_tagged", "idx_outside", "ckpteval_rolling"}),
                            (["idx_tag"], {"idx_tagged", "idx_outside"})):
        built = _built(cached, names)
        assert set(built["tasks"]) == expected
        assert built == _built(fresh, names)


def test_rebuilt_exactly_when_a_file_or_lm_eval_changes(task_dir, tmp_path, builds, monkeypatch):
    cache = tmp_path / "cache"

    def index():
        before = len(builds)
        manager = _manager(task_dir, cache)
        return manager, len(builds) > before

    assert index()[1]
    assert not index()[1]
    tagged = task_dir / "idx_tagged.yaml"
    stat = tagged.stat()
    tagged.write_text(TAGGED.replace("idx_tag]", "idx_tah]"))  # same size, same mtime: caught by content
    os.utime(tagged, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    manager, rebuilt = index()
    assert rebuilt and "idx_tah" in manager.task_index and not index()[1]
    (task_dir / "idx_new.yaml").write_text(TAGGED.replace("idx_tagged", "idx_new"))
    manager, rebuilt = index()
    assert rebuilt and "idx_new" in manager.task_index and not index()[1]
    (task_dir / "idx_new.yaml").unlink()
    manager, rebuilt = index()
    assert rebuilt and "idx_new" not in manager.task_index and not index()[1]
    template = task_dir / "_idx_template_yaml"  # included, not itself a task file
    template.write_text(TEMPLATE.replace("metadata:", "description: from the template\nmetadata:"))
    manager, rebuilt = index()
    assert rebuilt and manager.task_index["idx_tagged"].cfg["description"] == "from the template"
    manager, rebuilt = index()
    assert not rebuilt and manager.task_index["idx_tagged"].cfg["description"] == "from the template"
    outside = tmp_path / "shared" / "outside_template.yaml"  # included from outside the include path
    outside.write_text(outside.read_text().replace("metadata:", "description: from outside\nmetadata:"))
    manager, rebuilt = index()
    assert rebuilt and manager.task_index["idx_outside"].cfg["description"] == "from outside"
    assert not index()[1]
    (task_dir / "ckpteval_offline_data.py").write_text("# a loader edit does not change the index\n"
                                                       + (task_dir / "ckpteval_offline_data.py").read_text())
    assert not index()[1]
    import lm_eval

    monkeypatch.setattr(lm_eval, "__version__", "0.0.0-other")
    assert index()[1]


def test_corrupt_cache_is_rebuilt_with_a_warning(task_dir, tmp_path, builds, caplog):
    cache = tmp_path / "cache"
    _manager(task_dir, cache)
    (path,) = cache.glob("*.json")
    good = path.read_text()
    fresh = _manager(task_dir, cache)
    for broken in (good[: len(good) // 2], json.dumps({**json.loads(good), "entries": [["x", "NO_SUCH_KIND", None,
                                                                                        []]]}), "[]"):
        path.write_text(broken)
        caplog.clear()
        with caplog.at_level("WARNING", logger="ckpteval.evaluation.task_index"):
            manager = _manager(task_dir, cache)
        assert any("corrupt" in r.getMessage() or "unreadable" in r.getMessage() for r in caplog.records), broken[:80]
        _same_index(fresh, manager, cfg_names=[])
        assert json.loads(path.read_text())["fingerprint"] == json.loads(good)["fingerprint"]  # rewritten whole
    assert len(builds) == 4


def test_unwritable_cache_dir_warns_and_still_indexes(task_dir, tmp_path, caplog):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a dir")
    with caplog.at_level("WARNING", logger="ckpteval.evaluation.task_index"):
        manager = _manager(task_dir, blocked / "cache")
    assert "idx_tagged" in manager.task_index
    assert any("could not cache lm-eval's task index" in r.getMessage() for r in caplog.records)


def test_concurrent_writers_leave_one_whole_cache(task_dir, tmp_path):
    cache = tmp_path / "cache"
    errors: list[BaseException] = []

    def job():
        try:
            _manager(task_dir, cache)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.suffix for p in cache.iterdir()] == [".json"]  # no temp file left behind
    from lm_eval.tasks import TaskManager

    _same_index(TaskManager(include_path=str(task_dir), include_defaults=False), _manager(task_dir, cache))


def test_reading_the_index_executes_nothing(tmp_path):
    """Indexing, caching and reading back a task whose YAML names Python (`!function`) imports none of it: only
    building that task would (and resolve_tasks names such files before it does)."""
    root = tmp_path / "tasks"
    root.mkdir()
    marker = tmp_path / "marker"
    (root / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef process(x):\n    return x\n")
    (root / "evil_task.yaml").write_text(TEMPLATE.replace("custom_dataset: !function ckpteval_offline_data.load_mc",
                                                          "task: evil_task\ncustom_dataset: !function evil.process"))
    first = _manager(root, tmp_path / "cache")
    cached = _manager(root, tmp_path / "cache")
    assert cached.task_index["evil_task"].cfg == first.task_index["evil_task"].cfg
    assert isinstance(cached.task_index["evil_task"].cfg["custom_dataset"], str)
    assert not marker.exists()


def test_resolve_tasks_uses_the_cache_across_processes(tmp_path, builds):
    """`resolve_tasks` with a cache dir: a second process (per-process memory cleared) indexes nothing."""
    from omegaconf import OmegaConf

    from ckpteval.config import HarnessConfig
    from ckpteval.evaluation import harness as glue

    hcfg = OmegaConf.structured(HarnessConfig(tasks=["ckpteval_mc"], include_path=str(TASKS_DIR)))
    for _ in range(2):
        glue._RESOLVED.clear()
        glue._MANAGERS.clear()
        resolved = glue.resolve_tasks(hcfg, tmp_path / "index")
        assert list(resolved.leaf_tasks) == ["ckpteval_mc"]
    assert builds == [[str(TASKS_DIR)]]
    glue._MANAGERS.clear()


@pytest.mark.slow
def test_full_index_from_cache_equals_a_fresh_task_manager(tmp_path, tiny_hf_ckpt, builds):
    """With lm-eval's built-in tasks: the first call is lm-eval's own TaskManager (nothing cached), the second
    reads the cache. Every entry, the parsed YAML of 400 entries and of the groups and tasks below, the full
    configs lm-eval's factory builds built-in tasks and groups from (their datasets are not available offline),
    the leaf tasks of groups and tags, and include-path tasks as objects and as metrics of one model."""
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    from ckpteval.evaluation.harness import _leaf_entries

    fresh = _manager(TASKS_DIR, tmp_path / "cache", defaults=True)
    assert type(fresh) is TaskManager and len(builds) == 1
    assert builds[0] == [str(Path(lm_eval.__file__).parent / "tasks"), str(TASKS_DIR)]
    cached = _manager(TASKS_DIR, tmp_path / "cache", defaults=True)
    assert len(builds) == 1 and type(cached) is TaskManager
    assert len(cached.task_index) > 10_000
    named = ["mmlu", "mmlu_stem", "arc_easy", "hellaswag", "ai2_arc", "gsm8k", "ckpteval_mc", "ckpteval_rolling"]
    _same_index(fresh, cached, cfg_names=named + random.Random(0).sample(sorted(fresh.task_index), 400))
    for name in ("arc_easy", "hellaswag", "gsm8k", "mmlu", "mmlu_stem", "mmlu_anatomy"):
        entry, other = fresh.task_index[name], cached.task_index[name]
        assert entry.kind in (Kind.TASK, Kind.GROUP)
        assert fresh._factory._load_full_config(entry) == cached._factory._load_full_config(other), name
    for name in ("mmlu", "ai2_arc", "mmlu_humanities_tasks"):
        leaves = [e.name for e in _leaf_entries(fresh, name)]
        assert len(leaves) >= 2 and leaves == [e.name for e in _leaf_entries(cached, name)], name
    names = ["ckpteval_mc", "ckpteval_rolling"]
    assert _built(cached, names) == _built(fresh, names)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckpteval.evaluation.fast_lm import FastLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_ckpt).eval()
    tok = AutoTokenizer.from_pretrained(tiny_hf_ckpt)
    results = [simple_evaluate(model=FastLM(model, tok, batch_size=8), tasks=names, task_manager=m, limit=8,
                               bootstrap_iters=0, random_seed=1, numpy_random_seed=1, torch_random_seed=1,
                               fewshot_random_seed=1)["results"] for m in (fresh, cached)]
    assert results[0] == results[1] and results[0]["ckpteval_mc"]["acc,none"] >= 0

"""The layering, read from the source: no import cycle among our modules (imports inside functions count: they
are cycles that only wait for the first call), and the rules of who imports whom.

Modules are the files of src/ckpteval, hydra_plugins and run.py. An edge A -> B means A imports B, at module
level or inside a function; `from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from tests import factories

REPO = factories.REPO


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO / "src") if path.is_relative_to(REPO / "src") else path.relative_to(REPO)
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    files = [*(REPO / "src" / "ckpteval").rglob("*.py"), *(REPO / "hydra_plugins").rglob("*.py"), REPO / "run.py"]
    return {_module_name(p): p for p in files if "__pycache__" not in p.parts}


def _known(name: str) -> str | None:
    """The module of ours `name` is, or lives in (`ckpteval.job.Job` -> `ckpteval.job`); None for libraries."""
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {t for a in node.names if (t := _known(a.name))}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            for alias in node.names:
                target = f"{root}.{alias.name}" if f"{root}.{alias.name}" in modules() else _known(root)
                if target:
                    found.add(target)
    found.discard(module)
    return found


@cache
def graph() -> dict[str, frozenset[str]]:
    return {m: frozenset(_imports(m, p)) for m, p in modules().items()}


def strongly_connected(g: dict[str, frozenset[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the groups of modules that import each other, size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0
    for root in sorted(g):
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(g[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph()[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_finder_sees_the_code_and_finds_a_cycle():
    """The finder itself: it reads every module (function-level imports included) and does report a cycle."""
    g = graph()
    assert {"run", "ckpteval.app", "ckpteval.job", "hydra_plugins.ckpteval_sweeper.ckpteval_sweeper"} <= set(g)
    assert "ckpteval.app" in g["run"]  # imported inside `main`
    assert strongly_connected({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}),
                               "d": frozenset({"a"})}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert strongly_connected(graph()) == []


def test_job_imports_no_mode():
    """The lifecycle owner runs modes it is handed (app.MODES, modes/watch.py), it never reaches up into them."""
    assert not {m for m in reachable("ckpteval.job") if m.startswith("ckpteval.modes")}


def test_modes_share_blocks_not_each_other():
    """Only `mode=watch` composes other modes: the per-checkpoint evaluations it hands to the watcher."""
    allowed = {"ckpteval.modes.watch": {"ckpteval.modes.loss", "ckpteval.modes.harness"}}
    for mode in (m for m in graph() if m.startswith("ckpteval.modes.")):
        others = {t for t in graph()[mode] if t.startswith("ckpteval.modes")} - allowed.get(mode, set())
        assert not others, (mode, others)


@pytest.mark.parametrize("module, may_import", [
    ("ckpteval.errors", set()),
    ("ckpteval.metrics", set()),
    ("ckpteval.steps", set()),
    ("ckpteval.dtypes", {"ckpteval.errors"}),
    ("ckpteval.fsutil", set()),
])
def test_rule_modules_depend_on_nothing(module, may_import):
    """The small modules that hold one definition of a rule: every layer may import them, so they import
    (almost) nothing of ours."""
    assert graph()[module] <= may_import, graph()[module]


def test_formats_import_only_their_own_helpers():
    """A family module reads its layout with the shared helpers (the private `formats._*` modules: DCP, names and
    shapes, MoE routing, torchtitan's architectures), never with detect/load (which use the families) nor another
    family (formats.hf aside: its weight-file listing is the HF layout torchtitan's export shares)."""
    allowed = {"ckpteval.checkpoint.formats", "ckpteval.checkpoint.formats.base", "ckpteval.checkpoint.formats._common",
               "ckpteval.checkpoint.formats._dcp", "ckpteval.checkpoint.safe_pickle", "ckpteval.errors",
               "ckpteval.checkpoint.info", "ckpteval.checkpoint.formats.hf"}
    for module in (m for m in graph() if m.startswith("ckpteval.checkpoint.formats")):
        extra = {m for m in graph()[module] - allowed if not m.startswith("ckpteval.checkpoint.formats._")}
        assert not extra, (module, extra)


def test_tracking_is_below_the_watcher_scans_and_modes():
    """Everything MLflow lives in tracking/; it imports none of the layers that use it."""
    above = ("ckpteval.watch", "ckpteval.scan", "ckpteval.modes", "ckpteval.job", "ckpteval.app")
    for module in (m for m in graph() if m.startswith("ckpteval.tracking")):
        assert not {t for t in graph()[module] if t.startswith(above)}, module

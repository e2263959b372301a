"""The benchmarks' timers wrap functions by module and name: after a refactor moves one, the benchmark would fail
only when someone runs it. Every (module, attribute) a benchmark times must still resolve."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("name", ["bench_harness", "bench_adapter_scan"])
def test_every_timed_function_exists(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module(name)
    missing = []
    for bucket, module, attr in bench.TIMERS:
        owner = importlib.import_module(module)
        for part in attr.split("."):
            owner = getattr(owner, part, None)
        if not callable(owner):
            missing.append(f"{module}.{attr} ({bucket})")
    assert not missing, f"{name}.TIMERS names functions that no longer exist: {missing}"

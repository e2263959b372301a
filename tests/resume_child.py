"""A job killed at a chosen point of its work, for real: `python tests/resume_child.py SIGNAL KIND COUNT -- ARGS`
runs `run.py ARGS` in this process and, once this process has recorded COUNT results of KIND (ll, roll, gen: the
harness's loglikelihood, rolling and generation requests; w: loss windows; `*`: any kind) in the result store, sends SIGNAL (SIGKILL, SIGTERM) to its whole process group, as a preemption does
(under torchrun: every rank and torchrun).

Used by tests/test_resume.py and benchmarks/bench_resume.py; the only thing added to the job is the count."""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    name, kind, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    args = sys.argv[sys.argv.index("--") + 1:]
    from ckpteval.evaluation import result_store

    add = result_store.Entry.add
    recorded = [0]

    def counting_add(self, pairs, seconds):
        pairs = list(pairs)
        add(self, pairs, seconds)
        recorded[0] += sum(1 for key, _ in pairs if kind in ("*", key.split(":", 1)[0]))
        if recorded[0] >= count:
            print(f"resume_child: {recorded[0]} {kind} results recorded: sending {name}", flush=True)
            os.killpg(0, getattr(signal, name))

    result_store.Entry.add = counting_add
    sys.argv = [str(REPO / "run.py"), *args]
    runpy.run_path(str(REPO / "run.py"), run_name="__main__")


if __name__ == "__main__":
    main()

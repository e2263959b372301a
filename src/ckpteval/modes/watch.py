"""`mode=watch`: evaluate every new checkpoint in a directory exactly once, unattended.

    python run.py mode=watch watch.dir=/ckpts/run1 data=local data.dataset_path=/data/val       # loss, forever
    python run.py mode=watch watch.dir=/ckpts/run1 watch.plan=[loss,harness] harness=default \\
        watch.heavy.tasks=[mmlu] watch.heavy.num_fewshot=5 watch.heavy.every_n_steps=4000
    python run.py mode=watch watch.dir=s3://bucket/run1 watch.once=true                     # backlog, then exit

Each (checkpoint, evaluation) pair gets its own MLflow run (`loss/step_0001200`, tags mode=watch, ckpt, step,
ckpt_identity, evaluation) holding the same metrics `mode=loss` / `mode=harness` log; a "watch/<dir>" run
shows the watcher's progress. See `ckpteval.watch` for discovery, the plan, the ledger and the loop.
"""

from __future__ import annotations

import json
from typing import Any

from ckpteval.errors import CkptEvalError
from ckpteval.results import result_block


def run(cfg, job) -> dict[str, Any]:
    from ckpteval.watch.service import Watcher

    if job.dist.world_size > 1:
        raise CkptEvalError("mode=watch runs as one process (it evaluates one checkpoint at a time): launch it with "
                            "python run.py, not torchrun")
    summary = Watcher(cfg, job.dist, job.out_dir).run()
    print(result_block(f"watch {cfg.watch.dir}", summary), flush=True)
    print(json.dumps(summary), flush=True)
    return summary

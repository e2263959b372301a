"""`mode=watch`: evaluate every new checkpoint in a directory exactly once, unattended.

    python run.py mode=watch watch.dir=/ckpts/run1 data=local data.dataset_path=/data/val       # loss, forever
    python run.py mode=watch watch.dir=/ckpts/run1 watch.plan=[loss,harness] harness=default \\
        watch.heavy.tasks=[mmlu] watch.heavy.num_fewshot=5 watch.heavy.every_n_steps=4000
    python run.py mode=watch watch.dir=s3://bucket/run1 watch.once=true                     # backlog, then exit

Each (checkpoint, evaluation) pair gets its own MLflow run (`watch:loss@1200`, tags mode=watch, ckpt, step,
ckpt_identity, evaluation) holding the same metrics `mode=loss` / `mode=harness` log: this mode hands the watcher
exactly their per-checkpoint evaluations. A `watcher:<dir>` run shows the watcher's progress. See
`ckpteval.watch` for discovery, the plan, the ledger and the loop.
"""

from __future__ import annotations

import json
from typing import Any

from ckpteval.errors import CkptEvalError
from ckpteval.results import result_block


def run(cfg, job) -> dict[str, Any]:
    from ckpteval.watch.service import Watcher
    from ckpteval.watch.validation import validate

    if job.dist.world_size > 1:
        raise CkptEvalError("mode=watch runs as one process (it evaluates one checkpoint at a time): launch it with "
                            "python run.py, not torchrun")
    validate(cfg)
    summary = Watcher(cfg, job.dist, job.out_dir, evaluations=evaluations(cfg)).run()
    print(result_block(f"watch {cfg.watch.dir}", summary), flush=True)
    print(json.dumps(summary), flush=True)
    return summary


def evaluations(cfg) -> dict[str, Any]:
    """kind -> evaluate(cfg, job, path, harness_cfg): the evaluations `watch.plan` and `watch.heavy` need, the
    ones a `mode=loss` / `mode=harness` job runs (looked up when called, so the watcher runs the same code)."""
    from ckpteval.modes import loss

    def loss_evaluation(cfg, job, path: str, harness_cfg=None) -> dict[str, Any]:
        return loss.evaluate_checkpoint_loss(cfg, job, path)

    out = {"loss": loss_evaluation}
    w = cfg.watch
    if "harness" in w.plan or (w.heavy.tasks and w.heavy.every_n_steps > 0):
        try:
            from ckpteval.modes import harness
        except ImportError as exc:
            raise CkptEvalError(f"watch.plan/watch.heavy need the harness evaluation, which cannot be imported "
                                f"({exc}): pip install 'ckpteval[harness]', or use watch.plan=[loss]") from None

        def harness_evaluation(cfg, job, path: str, harness_cfg=None) -> dict[str, Any]:
            return harness.evaluate_checkpoint_harness(cfg, job, path, harness_cfg=harness_cfg)

        out["harness"] = harness_evaluation
    return out

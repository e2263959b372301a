"""Which evaluations a checkpoint gets: a pure function of its step and `watch.*`, never of arrival order.

    watch.plan=[loss,harness]                          every checkpoint: loss + the `harness` suite
    watch.heavy.tasks=[mmlu] watch.heavy.every_n_steps=4000 watch.heavy.num_fewshot=5
                                                       + "heavy" (MMLU 5-shot) when step % 4000 == 0

Because the decision depends only on the step, a watcher that starts late, backfills newest-first or is
restarted mid-way gives every checkpoint the same evaluations as one that saw them arrive in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckpteval.errors import CkptEvalError


@dataclass(frozen=True)
class Evaluation:
    name: str  # the MLflow tag `evaluation` and the run-name prefix: loss | harness | heavy
    kind: str  # loss | harness
    harness_overrides: dict[str, Any] = field(default_factory=dict)  # merged over cfg.harness (heavy suites)

    def __hash__(self) -> int:
        return hash((self.name, self.kind))


def validate_plan(watch_cfg) -> None:
    """Fail at startup (not on the first checkpoint) for a plan that cannot run."""
    plan = [str(p) for p in watch_cfg.plan or []]  # EvalKind: an unknown name failed at compose time
    if len(set(plan)) != len(plan):
        raise CkptEvalError(f"watch.plan={plan} lists an evaluation twice: list each once")
    heavy = watch_cfg.heavy
    if heavy.every_n_steps < 0:
        raise CkptEvalError(f"watch.heavy.every_n_steps={heavy.every_n_steps} is negative: use 0 (never) or N > 0")
    if heavy.every_n_steps > 0 and not heavy.tasks:
        raise CkptEvalError("watch.heavy.every_n_steps is set but watch.heavy.tasks is empty: name the heavy "
                            "suite, e.g. watch.heavy.tasks=[mmlu] watch.heavy.num_fewshot=5")
    if heavy.name in plan:
        raise CkptEvalError(f"watch.heavy.name={heavy.name!r} clashes with watch.plan: choose another name")
    if not plan and not (heavy.tasks and heavy.every_n_steps > 0):
        raise CkptEvalError("nothing to evaluate: set watch.plan=[loss] (and/or harness) or a heavy suite "
                            "(watch.heavy.tasks=[...] watch.heavy.every_n_steps=N)")


def heavy_due(step: int | None, every_n_steps: int) -> bool:
    """Heavy suites run at steps that are multiples of the cadence (step 0 included); unknown steps never."""
    return every_n_steps > 0 and step is not None and step % every_n_steps == 0


def plan_evaluations(step: int | None, watch_cfg) -> list[Evaluation]:
    """The evaluations for a checkpoint at `step`, in the order they run."""
    evals = [Evaluation(name=str(kind), kind=str(kind)) for kind in (watch_cfg.plan or [])]
    heavy = watch_cfg.heavy
    if heavy.tasks and heavy_due(step, heavy.every_n_steps):
        overrides: dict[str, Any] = {"tasks": list(heavy.tasks)}
        if heavy.num_fewshot is not None:
            overrides["num_fewshot"] = heavy.num_fewshot
        if heavy.limit is not None:
            overrides["limit"] = heavy.limit
        evals.append(Evaluation(name=heavy.name, kind="harness", harness_overrides=overrides))
    return evals


def harness_config(cfg, evaluation: Evaluation):
    """cfg.harness with the evaluation's overrides merged over it (None = use cfg.harness as is)."""
    if not evaluation.harness_overrides:
        return None
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(cfg.harness, evaluation.harness_overrides)
    OmegaConf.set_readonly(merged, False)
    return merged

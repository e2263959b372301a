"""ckpteval's Hydra sweeper: Hydra's basic sweeper, plus `key=glob:PATTERN` values, failure-tolerant jobs and the
scan's parent run and summary.

    python run.py -m mode=loss ckpt='glob:ckpts/step_*'                  # one job per complete checkpoint
    python run.py -m mode=loss,harness ckpt='glob:ckpts/step_*'          # x every other sweep (cartesian)
    python run.py -m ckpt='glob:ckpts/step_*' hydra.sweeper.every=5      # every 5th checkpoint + the newest
    python run.py sweep=scan_loss ckpt='glob:ckpts/step_*'               # a ready sweep file (conf/sweep/)

Selected in conf/config.yaml (`override hydra/sweeper: ckpteval`). What it adds to BasicSweeper:
- the scan's MLflow parent run, opened first so every job nests under it (`tracking.parent_run_id`) and ended
  by `ckpteval.job.run_scan` (FINISHED, FAILED, or KILLED by a signal): one owner;
- `glob:` values (command line or `hydra.sweeper.params`) expand to the matching complete checkpoints in step
  order (ckpteval.scan.expand); incomplete ones are skipped with a warning and listed in the summary;
- a failed job does not stop the scan: it is logged, its MLflow run is FAILED, the summary lists it, and the
  scan exits 1 after the summary (ckpteval.scan.summary); a user error (no match) is one `error:` line, exit 2.

This module is imported on every Hydra start (plugin discovery): keep its imports light. Hydra executes it
without registering it in sys.modules, so no `from __future__ import annotations` (dataclasses would fail).
"""

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional  # noqa: UP035 - OmegaConf reads these in the dataclass below

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from omegaconf import OmegaConf

log = logging.getLogger("ckpteval.sweep")


@dataclass
class CkptEvalSweeperConf:
    _target_: str = "hydra_plugins.ckpteval_sweeper.ckpteval_sweeper.CkptEvalSweeper"
    max_batch_size: Optional[int] = None  # noqa: UP045 - jobs handed to the launcher at once (None = all)
    # sweeps written in config files (conf/sweep/*.yaml): {ckpt: "glob:ckpts/step_*", mode: "loss,harness"}
    params: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    every: int = 1  # keep every Nth checkpoint of each glob (in step order), always with the newest
    skip_incomplete: bool = True  # skip (with a warning, and a SKIPPED row) matches that are not complete checkpoints


ConfigStore.instance().store(group="hydra/sweeper", name="ckpteval", node=CkptEvalSweeperConf, provider="ckpteval")


class CkptEvalSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None,
                 every: int = 1, skip_incomplete: bool = True) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        if every < 1:
            raise HydraException(f"hydra.sweeper.every={every}: use 1 (every checkpoint) or more")
        self.every = every
        self.skip_incomplete = skip_incomplete
        self.skipped: list = []  # ckpteval.scan.Skipped: matches that are no complete checkpoint

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        """Hydra's, with the scan's config loader reusing a composition when only plain values differ (the next
        checkpoint's `ckpt=PATH`): ~0.13 s a job less (ckpteval.scan.compose)."""
        from hydra.types import HydraContext

        from ckpteval.scan.compose import ReusedComposition

        context = HydraContext(config_loader=ReusedComposition(hydra_context.config_loader),
                               callbacks=hydra_context.callbacks)
        super().setup(hydra_context=context, task_function=task_function, config=config)

    def job_batches(self, arguments: list[str], parent_run_id: str | None = None) -> list[list[list[str]]]:
        """The jobs' override lists, in batches of max_batch_size: glob values expanded, products taken; the
        skipped matches go to `self.skipped`."""
        import itertools

        from ckpteval import scan

        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        cwd = os.getcwd()

        def expand(pattern: str) -> list[str]:
            found = scan.match_pattern(pattern, cwd=cwd, skip_incomplete=self.skip_incomplete)
            self.skipped += found.skipped
            return scan.every_nth(found.complete, self.every)

        self.skipped = []
        lists = scan.job_override_lists(overrides, expand, parent_run_id=parent_run_id)
        jobs = [list(x) for x in itertools.product(*lists)]
        return [list(chunk) for chunk in self.split_overrides_to_chunks(jobs, self.max_batch_size)]

    def sweep(self, arguments: list[str]) -> Any:
        from ckpteval.errors import CkptEvalError
        from ckpteval.job import EXIT_JOBS_FAILED, JobStopped, exit_with, run_scan
        from ckpteval.tracking import print_view
        from ckpteval.tracking.naming import scan_run_name

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        name = scan_run_name(OmegaConf.select(self.config, "mode.name"), str(sweep_dir))
        tags = {"sweep_dir": str(sweep_dir), "overrides": " ".join(map(str, self.config.hydra.overrides.task))[:5000]}
        try:
            returns, records, parent = run_scan(self.config.tracking, name=name, tags=tags,
                                                body=lambda parent: self._scan(arguments, parent, sweep_dir))
        except (CkptEvalError, JobStopped) as exc:  # no match, a bad override, the store, a stop signal
            exit_with(exc)
        if parent.active:
            print_view(parent, label=f"parent run {name} ({parent.run_id})")
        if any(r.failed for r in records):
            sys.exit(EXIT_JOBS_FAILED)
        return returns

    def _scan(self, arguments: list[str], parent, sweep_dir: Path) -> tuple[list, list, Any]:
        """Expand, launch every batch, summarize: the body of the parent run."""
        import gc

        from ckpteval import scan

        started = time.time()
        self.overrides = self.job_batches(arguments, parent_run_id=parent.run_id)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns = self._launch_all()
        gc.unfreeze()  # what the jobs' callback froze for the collector (scan.callback.freeze_survivors)
        records = scan.load_records(sweep_dir, since=started, skipped=self.skipped)
        scan.summarize(records, sweep_dir, parent, config=self.config)
        return returns, records, parent

    def _launch_all(self) -> list[Sequence[JobReturn]]:
        assert self.launcher is not None
        returns: list[Sequence[JobReturn]] = []
        first = 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=first)
            for num, result in enumerate(results, first):
                # BasicSweeper re-raises here and stops; a bad checkpoint must not end a 20-checkpoint scan.
                if result.status != JobStatus.COMPLETED:
                    log.warning("job #%d failed (%s): %s; the sweep goes on", num, " ".join(result.overrides or []),
                                _describe(result._return_value))
            first += len(batch)
            returns.append(results)
        return returns


def _describe(exc: Any) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if len(text) > 600:  # keep both ends: the path comes first, the fix last
        text = text[:300] + " ... " + text[-295:]
    return text if type(exc).__name__ == "CkptEvalError" else f"{type(exc).__name__}: {text}"

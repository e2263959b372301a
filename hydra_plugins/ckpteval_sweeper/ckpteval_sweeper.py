"""ckpteval's Hydra sweeper: Hydra's basic sweeper, plus `key=glob:PATTERN` values and failure-tolerant jobs.

    python run.py -m mode=loss ckpt='glob:ckpts/step_*'                  # one job per complete checkpoint
    python run.py -m mode=loss,harness ckpt='glob:ckpts/step_*'          # x every other sweep (cartesian)
    python run.py -m ckpt='glob:ckpts/step_*' hydra.sweeper.every=5      # every 5th checkpoint + the newest

Selected in conf/config.yaml (`override hydra/sweeper: ckpteval`). What it adds to BasicSweeper:
- `glob:` values (command line or `hydra.sweeper.params`) expand to the matching complete checkpoints in step
  order (ckpteval.sweep.expand_pattern); incomplete ones are skipped with a warning; no match is an error;
- a failed job does not stop the sweep: it is logged, its MLflow run is FAILED, the summary lists it;
- every job gets `tracking.parent_run_id` = the sweep's MLflow parent run (opened by ckpteval.sweep.SweepCallback).
It also registers multirun_sweeps/*.yaml as the `sweep` config group (`python run.py +sweep=scan_loss`).

This module is imported on every Hydra start (plugin discovery): keep its imports light. Hydra executes it
without registering it in sys.modules, so no `from __future__ import annotations` (dataclasses would fail).
"""

import logging
import os
import sys
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
    # sweeps written in config files (multirun_sweeps/*.yaml): {ckpt: "glob:ckpts/step_*", mode: "loss,harness"}
    params: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    every: int = 1  # keep every Nth checkpoint of each glob (in step order), always with the newest
    skip_incomplete: bool = True  # skip (with a warning) matches that are not complete checkpoints


ConfigStore.instance().store(group="hydra/sweeper", name="ckpteval", node=CkptEvalSweeperConf, provider="ckpteval")


def _sweep_files_dir() -> Path | None:
    """multirun_sweeps/ of the checkout this plugin lives in, else of the working dir."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "multirun_sweeps").is_dir():
            return root / "multirun_sweeps"
    return None


def register_sweep_files() -> None:
    """multirun_sweeps/NAME.yaml -> config `sweep/NAME` (package _global_), so `+sweep=NAME` selects it."""
    folder = _sweep_files_dir()
    if folder is None:
        return
    for path in sorted(folder.glob("*.yaml")):
        ConfigStore.instance().store(group="sweep", name=path.stem, node=OmegaConf.load(path), package="_global_",
                                     provider="ckpteval")


register_sweep_files()


class CkptEvalSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None,
                 every: int = 1, skip_incomplete: bool = True) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        if every < 1:
            raise HydraException(f"hydra.sweeper.every={every}: use 1 (every checkpoint) or more")
        self.every = every
        self.skip_incomplete = skip_incomplete

    def job_batches(self, arguments: list[str]) -> list[list[list[str]]]:
        """The jobs' override lists, in batches of max_batch_size: glob values expanded, products taken."""
        import itertools

        from ckpteval import sweep

        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        cwd = os.getcwd()
        lists = sweep.job_override_lists(
            overrides,
            lambda pattern: sweep.expand_pattern(pattern, cwd=cwd, every=self.every,
                                                 skip_incomplete=self.skip_incomplete),
            parent_run_id=sweep.parent_run_id())
        jobs = [list(x) for x in itertools.product(*lists)]
        return [list(chunk) for chunk in self.split_overrides_to_chunks(jobs, self.max_batch_size)]

    def sweep(self, arguments: list[str]) -> Any:
        from ckpteval import sweep
        from ckpteval.errors import CkptEvalError
        from ckpteval.job import stop_signals

        try:
            with stop_signals():  # SIGTERM/SIGHUP between or inside jobs: the jobs' runs and the parent end KILLED
                return self._run(arguments)
        except CkptEvalError as exc:  # a user error (no match, ...): one line, like app.main
            sweep.end_parent_run("FAILED", str(exc))
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
        except BaseException as exc:
            interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
            sweep.end_parent_run("KILLED" if interrupted else "FAILED", f"{type(exc).__name__}: {exc}")
            raise

    def _run(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        self.overrides = self.job_batches(arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
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

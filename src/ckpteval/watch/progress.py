"""What the watcher tells while it works: one log line per decision and per change of a checkpoint's state, a
heartbeat line, and the watcher's own MLflow run (`watcher:<dir>`: its counts per poll, and every evaluation's
metrics at its checkpoint step, so its charts are the eval curves).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ckpteval.metrics import measured
from ckpteval.watch.discovery import READY, UNSTABLE, Candidate
from ckpteval.watch.ledger import DONE, FAILED, Ledger
from ckpteval.watch.plan import plan_evaluations

log = logging.getLogger("ckpteval.watch")


@dataclass
class Progress:
    """This session's counts, published as a heartbeat (log line + the summary run's metrics)."""

    heartbeat_s: float
    summary_run: Any = None  # the watcher's own MLflow run (an inactive Run when tracking is off)
    evaluated: int = 0
    failed: int = 0
    retried: int = 0
    polls: int = 0
    latest_step: int | None = None
    _last_beat: float = 0.0
    _last_n: int = 0

    def counts(self, ledger: Ledger | None, pending: int) -> dict[str, float]:
        done = {"watch/done": ledger.count(DONE), "watch/failed": ledger.count(FAILED)} if ledger is not None else {}
        return {**done, "watch/pending": pending, "watch/evaluated": self.evaluated, "watch/retries": self.retried,
                "watch/polls": self.polls,
                **({"watch/latest_step": self.latest_step} if self.latest_step is not None else {})}

    def publish(self, ledger: Ledger, pending: int, force: bool = False) -> None:
        """Heartbeat log line + summary-run metrics, at most every watch.heartbeat_s (and after each evaluation)."""
        now = time.monotonic()
        evaluated = self.evaluated + self.failed
        if not force and now - self._last_beat < self.heartbeat_s and evaluated == self._last_n:
            return
        self._last_beat, self._last_n = now, evaluated
        counts = self.counts(ledger, pending)
        log.info("heartbeat: %d done, %d failed, %d checkpoint(s) pending, %d evaluated this session",
                 counts["watch/done"], counts["watch/failed"], counts["watch/pending"], counts["watch/evaluated"])
        if self.summary_run is None:
            return
        try:
            self.summary_run.log_metrics(counts, step=self.polls)
            self.summary_run.set_tags({"heartbeat": time.strftime("%Y-%m-%dT%H:%M:%S")})
        except Exception as exc:  # noqa: BLE001 - the summary run is best effort; evaluations carry the results
            log.warning("could not update the watcher run: %s", exc)

    def log_curve(self, result: dict[str, Any], step: int | None) -> None:
        """The watcher's summary run carries the eval curves: each evaluation's metrics at its checkpoint step."""
        if step is not None:
            self.latest_step = max(self.latest_step or 0, step)
        if step is None or self.summary_run is None:
            return
        try:
            self.summary_run.log_metrics(measured(result), step=step)
        except Exception as exc:  # noqa: BLE001 - best effort, as the heartbeat
            log.warning("could not log the curve to the watcher run: %s", exc)


@dataclass
class StateLog:
    """One log line per change of a candidate's state: reasons are compared with their numbers blanked, so
    "truncated (N bytes)" growing poll after poll is still the same state."""

    watch_cfg: Any
    known: dict[str, tuple[str, str]] = field(default_factory=dict)  # candidate name -> (state, reason) logged

    def forget(self, present: set[str]) -> None:
        for gone in set(self.known) - present:
            del self.known[gone]

    def log(self, cand: Candidate, ledger: Ledger) -> None:
        w = self.watch_cfg
        before = self.known.get(cand.name)
        reason = re.sub(r"\d+(\.\d+)?", "#", cand.reason) if cand.state != UNSTABLE else ""
        now = (cand.state, reason)
        if before == now:
            return
        self.known[cand.name] = now
        if cand.step is not None and cand.step < w.from_step:
            if before is None:
                log.info("skipped %s (step %s): before watch.from_step=%d", cand.url, cand.step, w.from_step)
            return
        if cand.state == READY:
            self._log_ready(cand, ledger)
        elif cand.state == UNSTABLE:
            if before is not None:  # first look at a checkpoint is always "unstable": no news
                log.info("found %s (step %s): complete, waiting %gs for its files to stop changing", cand.url,
                         cand.step, w.stable_s)
        else:
            log.info("waiting for %s (step %s): %s", cand.url, cand.step, cand.reason)

    def _log_ready(self, cand: Candidate, ledger: Ledger) -> None:
        evals = [ev.name for ev in plan_evaluations(cand.step, self.watch_cfg)]
        done = [e for e in evals if ledger.status(cand.identity, e) == DONE]
        failed = [e for e in evals if ledger.status(cand.identity, e) == FAILED]
        if len(done) + len(failed) == len(evals):
            log.info("skipped %s (step %s): already evaluated (%s)", cand.url, cand.step,
                     ", ".join([f"{e} done" for e in done] + [f"{e} failed" for e in failed]) or "empty plan")
        else:
            log.info("found %s (step %s): complete; plan %s%s", cand.url, cand.step, evals,
                     f" ({', '.join(done + failed)} already recorded)" if done or failed else "")

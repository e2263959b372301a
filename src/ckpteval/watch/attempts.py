"""One attempt at a (checkpoint, evaluation) pair, and what its outcome means for the ledger and the next try.

An attempt is counted when it starts (so a checkpoint that kills the process is not retried forever); it ends as
one `Outcome`, and `Attempts.settle` records what that means:

    DONE      finished, its run FINISHED                          -> done
    OUTBOX    finished, but the store went away at its end: run   -> done (the outbox replay delivers it, so it is
              and results wait in the outbox                         neither lost nor evaluated again)
    TRACKING  the store went away before it finished              -> given back (not an attempt): again when the
                                                                     store answers
    CLAIMED   another watcher's run has the pair (shared store)   -> given back: looked at again later
    STOPPED   a stop signal aborted it (its run ends KILLED)       -> given back: it runs again on the next start
    FAILED    anything else                                       -> retried after backoff_s * 2^(n-1), recorded
                                                                     failed after watch.max_attempts
A failure whose checkpoint was deleted meanwhile is no failure: the loop records it skipped instead.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ckpteval.errors import CkptEvalError
from ckpteval.metrics import is_number
from ckpteval.watch.discovery import Candidate
from ckpteval.watch.ledger import DONE, FAILED, STARTED, Ledger, pair_key
from ckpteval.watch.plan import Evaluation
from ckpteval.watch.progress import Progress

log = logging.getLogger("ckpteval.watch")


@dataclass
class Work:
    cand: Candidate
    evaluation: Evaluation

    @property
    def key(self) -> str:
        return pair_key(self.cand.identity, self.evaluation.name)

    def __str__(self) -> str:
        return f"{self.evaluation.name} on {self.cand.url} (step {self.cand.step})"


class Outcome(Enum):
    DONE = "done"
    OUTBOX = "outbox"
    TRACKING = "tracking"
    CLAIMED = "claimed"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class Attempt:
    work: Work
    number: int  # 1-based, counted in the ledger when it started
    previous: dict[str, Any] = field(default_factory=dict)  # the ledger entry before it: put back when it does not count
    outcome: Outcome | None = None
    result: dict[str, Any] | None = None
    run: Any = None  # its MLflow run, once one was opened (None when tracking is off)
    error: BaseException | None = None

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run is not None else None


@dataclass
class Attempts:
    """The ledger side of attempts, and the schedule of pairs that wait (`deferred`: pair key -> clock time)."""

    watch_cfg: Any
    progress: Progress
    ledger: Ledger | None = None
    deferred: dict[str, float] = field(default_factory=dict)

    def due(self, key: str, now: float) -> bool:
        return self.deferred.get(key, 0.0) <= now

    def defer(self, key: str, seconds: float) -> None:
        self.deferred[key] = time.monotonic() + seconds

    def begin(self, work: Work) -> Attempt | None:
        """Count a new attempt in the ledger; None (and the pair recorded failed) when earlier processes died
        during every allowed attempt (e.g. killed for memory)."""
        cand, ev, w = work.cand, work.evaluation, self.watch_cfg
        previous = self.ledger.get(cand.identity, ev.name) or {}
        number = int(previous.get("attempts", 0)) + 1
        if number > w.max_attempts:
            self.give_up(work, number - 1, "the watcher process died during every attempt", None)
            return None
        self.ledger.record(cand.identity, ev.name, STARTED, attempts=number, ckpt=cand.url, step=cand.step)
        log.info("started %s, attempt %d/%d", work, number, w.max_attempts)
        return Attempt(work, number, previous)

    def settle(self, attempt: Attempt) -> None:
        """Record what the attempt's outcome means (see the module docstring)."""
        {Outcome.DONE: self._done, Outcome.OUTBOX: self._done, Outcome.TRACKING: self._tracking_failed,
         Outcome.CLAIMED: self._claimed, Outcome.STOPPED: self._stopped, Outcome.FAILED: self._failed,
         }[attempt.outcome](attempt)

    def _done(self, attempt: Attempt) -> None:
        work = attempt.work
        self.deferred.pop(work.key, None)
        if attempt.outcome is Outcome.OUTBOX:
            self.ledger.record(work.cand.identity, work.evaluation.name, DONE, run_id=attempt.run_id,
                               tracking="outbox", error=None)
            log.warning("done %s, but the tracking store went away: run %s and its results wait in the outbox and "
                        "are sent when it answers again", work, attempt.run_id)
        else:
            metrics = {k: v for k, v in (attempt.result or {}).items() if is_number(v)}
            self.ledger.record(work.cand.identity, work.evaluation.name, DONE, run_id=attempt.run_id,
                               metrics=metrics, error=None)
        self.progress.evaluated += 1

    def _give_back(self, attempt: Attempt, delay: float | None = None) -> None:
        """Not an attempt after all: the ledger entry as it was, and (with `delay`) a later try."""
        work = attempt.work
        self.ledger.restore(work.cand.identity, work.evaluation.name, attempt.previous)
        if delay is not None:
            self.defer(work.key, delay)

    def _stopped(self, attempt: Attempt) -> None:
        log.warning("aborted %s: not marked done; it runs again on the next start", attempt.work)
        self._give_back(attempt)

    def _claimed(self, attempt: Attempt) -> None:
        log.info("skipped %s for now: another watcher's run %s has it", attempt.work, attempt.error)
        self._give_back(attempt, self.watch_cfg.interval * (0.5 + random.random()))

    def _tracking_failed(self, attempt: Attempt) -> None:
        self._give_back(attempt, self.watch_cfg.interval)
        log.warning("tracking store failed during %s: %s; not counted as an attempt, it runs again when the store "
                    "answers", attempt.work, str(attempt.error)[:300])

    def _failed(self, attempt: Attempt) -> None:
        work, exc, w = attempt.work, attempt.error, self.watch_cfg
        error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, CkptEvalError):  # not a known user error: the traceback is what a bug report needs
            log.warning("traceback of %s on %s", work.evaluation.name, work.cand.url, exc_info=exc)
        if attempt.number >= w.max_attempts:
            self.give_up(work, attempt.number, error, attempt.run)
            return
        delay = w.backoff_s * 2 ** (attempt.number - 1)
        self.defer(work.key, delay)
        self.ledger.record(work.cand.identity, work.evaluation.name, STARTED, attempts=attempt.number,
                           error=error[:2000], run_id=attempt.run_id)
        self.progress.retried += 1
        tag(attempt.run, {"watch_result": f"retry in {delay:g}s"})
        log.warning("attempt %d/%d of %s failed: %s; retrying in %gs", attempt.number, w.max_attempts, work,
                    error[:500], delay)

    def give_up(self, work: Work, attempts: int, error: str, run) -> None:
        cand, ev = work.cand, work.evaluation
        self.deferred.pop(work.key, None)
        self.ledger.record(cand.identity, ev.name, FAILED, attempts=attempts, error=error[:2000], ckpt=cand.url,
                           step=cand.step, run_id=run.run_id if run is not None else None)
        self.progress.failed += 1
        tag(run, {"watch_result": "failed"})
        log.error("failed %s after %d attempt(s): %s; recorded failed, moving on (watch.retry_failed=true retries "
                  "it)", work, attempts, error[:500])


def tag(run, tags: dict[str, Any]) -> None:
    """Tag an attempt's run (best effort: the ledger holds the truth)."""
    if run is None:
        return
    try:
        run.set_tags(tags)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not tag MLflow run: %s", exc)

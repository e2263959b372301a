"""The watcher loop: look, pick the next (checkpoint, evaluation) pair, evaluate it in its own MLflow run, repeat.

    Watcher(cfg, dist, out_root, evaluations={"loss": ..., "harness": ...}).run()   # modes/watch.py hands them

Its parts: `validation` (settings, state dir), `attempts` (one attempt, its outcome, retries and backoff),
`progress` (decision lines, heartbeat, the watcher's summary run), `ledger` (exactly-once and the lock),
`discovery` (what is ready) and `plan` (which evaluations). Decisions are logged one line each (found / waiting /
skipped / started / done / failed). SIGTERM/SIGINT/SIGHUP stop it cleanly (`ckpteval.job.stop_signals`):
between evaluations it exits at once; inside one it aborts it (that run ends KILLED, nothing is marked done, the
attempt is not counted) and exits. After every evaluation the loop looks again, so `watch.order=newest` lets a
checkpoint that arrived meanwhile jump the queue.
"""

from __future__ import annotations

import gc
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ckpteval.errors import CkptEvalError, TrackingError, TrackingOutbox
from ckpteval.job import Job, JobStopped, Stop, run_tracked, stop_signals
from ckpteval.metrics import headline, table_metrics
from ckpteval.tracking import flatten, mlflow_run, print_view
from ckpteval.tracking.naming import watch_run_name, watcher_run_name
from ckpteval.watch.attempts import Attempt, Attempts, Outcome, Work, tag
from ckpteval.watch.discovery import READY, Candidate, Discovery
from ckpteval.watch.ledger import DONE, FINAL, SKIPPED, Ledger, MlflowView, lock_for, pair_key
from ckpteval.watch.plan import Evaluation, harness_config, plan_evaluations
from ckpteval.watch.progress import Progress, StateLog
from ckpteval.watch.validation import default_state_dir, validate

log = logging.getLogger("ckpteval.watch")
# kind -> evaluate(cfg, job, path, harness_cfg): the per-checkpoint evaluation a `mode=<kind>` job runs
Evaluate = Callable[..., dict[str, Any]]


class ClaimedElsewhere(Exception):
    """Another watcher's run owns this (checkpoint, evaluation) pair on the shared store (two watchers on one dir
    whose lock could not exclude each other, e.g. an object store without atomic create): step back."""


class Watcher:
    def __init__(self, cfg, dist, out_root: Path, evaluations: Mapping[str, Evaluate] | None = None):
        validate(cfg)
        self.cfg, self.w, self.dist, self.out_root = cfg, cfg.watch, dist, Path(out_root)
        self.evaluations = dict(evaluations or {})
        self.discovery = Discovery(self.w.dir, float(self.w.stable_s), ckpt_config=cfg.get("ckpt_config"))
        self.watch_dir = self.discovery.url_of("").rstrip("/")
        self.state_dir = default_state_dir(cfg)
        self.downloads = self.state_dir / "downloads"
        self.scratch = self.state_dir / "scratch"
        self.wake = threading.Event()
        self.stop = Stop(raising=False, wake=[self.wake], doing="the watcher")
        self.progress = Progress(heartbeat_s=self.w.heartbeat_s)
        self.attempts = Attempts(self.w, self.progress)
        self.states = StateLog(self.w)
        self._pending: dict[str, tuple[Candidate, list[Evaluation]]] = {}  # name -> ready, not yet done
        self._store_down = False  # MLflow unreachable at the last check (logged once per outage)
        self._outbox_down = False  # the outbox replay found the store still away (logged once)
        self.view: MlflowView | None = None
        self.resolved = OmegaConf.to_container(cfg, resolve=True)

    @property
    def ledger(self) -> Ledger | None:
        return self.attempts.ledger

    @ledger.setter
    def ledger(self, ledger: Ledger) -> None:
        self.attempts.ledger = ledger

    # ------------------------------------------------------------------------------------------ lifecycle

    def run(self) -> dict[str, Any]:
        missing = {ev.kind for ev in plan_evaluations(0, self.w) + plan_evaluations(None, self.w)} - set(self.evaluations)
        if missing:
            raise ValueError(f"Watcher needs an evaluation function for {sorted(missing)} (modes/watch.py hands them)")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CkptEvalError(f"cannot create the watch state dir {self.state_dir} ({exc}): set "
                                "watch.state_dir=DIR to a writable place") from None
        self.ledger = Ledger(self.state_dir)
        # the lock belongs to the watched dir, not to this state dir: one watcher per watch.dir (ledger.lock_for)
        self.lock = lock_for(self.watch_dir, self.discovery.local, self.w.lock_stale_s, self.w.heartbeat_s)
        with stop_signals(self.stop):
            if not self._acquire_lock():
                return self._summary()
            observer = None
            try:
                self._startup()
                observer = self.discovery.start_events(self.wake) if self.w.events else None
                self._summary_run_and_loop()
            finally:
                if observer is not None:
                    observer.stop()
                self.lock.release()
                shutil.rmtree(self.downloads, ignore_errors=True)
                shutil.rmtree(self.scratch, ignore_errors=True)
        return self._summary()

    def _summary_run_and_loop(self) -> None:
        """The loop inside the watcher's own summary run. That run is progress only: if the store was away when
        it ended, it waits in the outbox like any run (sent by the next replay) and the watcher still exits 0;
        the evaluations' own outages are handled per pair (`attempts.Outcome.TRACKING`)."""
        try:
            with mlflow_run(self.cfg.tracking, enabled=True, run_name=watcher_run_name(self.watch_dir),
                            tags={"mode": "watch", "evaluation": "watcher", "watch_dir": self.watch_dir,
                                  "ckpt": self.watch_dir},
                            params=flatten(self.resolved)) as summary_run:
                self.progress.summary_run = summary_run
                if self.cfg.tracking.enabled:
                    print_view(summary_run, self.cfg.tracking)  # where the curves will appear
                self._loop()
                summary_run.set_tags({"stopped_by": self.stop.reason or "done"})
                self._publish(force=True)
        except TrackingError as exc:
            log.warning("the watcher's summary run could not be ended on the tracking store (%s): it waits in the "
                        "outbox for the next replay", str(exc)[:300])

    def _acquire_lock(self) -> bool:
        waiting_logged = False
        while not self.stop.stopped:
            if self.lock.acquire():
                log.info("watching %s (state %s, plan %s%s, order %s, every %gs)", self.watch_dir, self.state_dir,
                         [str(p) for p in self.w.plan], self._heavy_text(), self.w.order, self.w.interval)
                return True
            holder = self.lock.describe(self.lock.read())
            if self.w.once:
                log.warning("another watcher (%s) holds %s: it evaluates this dir; exiting", holder, self.lock.path)
                return False
            if not waiting_logged:
                log.warning("another watcher (%s) holds %s: standing by until it stops or its heartbeat is "
                            "older than watch.lock_stale_s=%gs", holder, self.lock.path, self.w.lock_stale_s)
                waiting_logged = True
            self.stop.wait(min(self.w.interval, max(self.w.lock_stale_s / 4, 0.1)))
        return False

    def _heavy_text(self) -> str:
        h = self.w.heavy
        if h.tasks and h.every_n_steps > 0:
            return f" + {h.name} {list(h.tasks)} every {h.every_n_steps} steps"
        return ""

    def _startup(self) -> None:
        shutil.rmtree(self.downloads, ignore_errors=True)  # a previous process's partial downloads
        shutil.rmtree(self.scratch, ignore_errors=True)
        if self.cfg.tracking.enabled:
            self.view = MlflowView.open(self.cfg.tracking)
            for run_id in self.view.end_orphans(self.watch_dir):
                log.warning("ended MLflow run %s KILLED: a previous watcher died while it ran", run_id)
            self._recover_from_mlflow()
        if self.w.retry_failed:
            reset = self.ledger.retry_failed()
            if reset:
                log.info("watch.retry_failed: %d failed evaluation(s) get another %d attempt(s)", reset,
                         self.w.max_attempts)

    def _recover_from_mlflow(self) -> None:
        """Pairs MLflow holds FINISHED that the ledger does not know done (a crash between the two writes)."""
        synced = 0
        for key, run_id in self.view.finished_pairs(self.watch_dir).items():
            if self.ledger.entries.get(key, {}).get("status") != DONE:
                identity, _, evaluation = key.partition("/")
                self.ledger.entries[key] = {**self.ledger.entries.get(key, {}), "status": DONE, "identity": identity,
                                            "evaluation": evaluation, "run_id": run_id, "time": time.time()}
                synced += 1
        if synced:
            self.ledger.save()
            log.info("ledger: %d finished evaluation(s) recovered from MLflow", synced)

    # ------------------------------------------------------------------------------------------ loop

    def _loop(self) -> None:
        dir_missing_logged = False
        while not self.stop.stopped:
            if self.lock.lost:
                raise CkptEvalError(f"another watcher took over {self.lock.path} (this one was judged stale): "
                                    "raise watch.lock_stale_s if evaluations block the heartbeat")
            if self.w.max_polls and self.progress.polls >= self.w.max_polls:
                log.info("watch.max_polls=%d reached: stopping", self.w.max_polls)
                return
            self.progress.polls += 1
            if not self.discovery.exists():
                if self.w.once:
                    raise CkptEvalError(f"watch.dir={self.w.dir} does not exist: check the path")
                if not dir_missing_logged:
                    log.warning("waiting for %s to appear", self.watch_dir)
                    dir_missing_logged = True
                self._sleep(self.w.interval)
                continue
            dir_missing_logged = False
            self._replay_outbox()
            try:
                candidates = self.discovery.look()
            except Exception as exc:
                if isinstance(exc, CkptEvalError):
                    raise
                log.warning("listing %s failed (%s: %s): retrying in %gs", self.watch_dir, type(exc).__name__, exc,
                            self.w.interval)
                self._sleep(self.w.interval)
                continue
            work = self._work(candidates)
            self._publish()
            now = time.monotonic()
            ready = [item for item in work if self.attempts.due(item.key, now)]
            if ready:
                self._evaluate(ready[0])
                continue  # look again before the next pair: new arrivals, deletions, order=newest
            waits = [t - now for item in work if (t := self.attempts.deferred.get(item.key)) is not None]
            stable_in = self.discovery.next_stable_in()
            if stable_in is not None:
                waits.append(stable_in + 0.05)
            if self.w.once and not waits:
                log.info("backlog done: exiting (watch.once=true)")
                return
            self._sleep(min(waits) if waits else self.w.interval, wake_on_events=not waits)

    def _sleep(self, seconds: float, wake_on_events: bool = True) -> None:
        seconds = max(0.0, min(seconds, self.w.interval))
        if not wake_on_events:
            self.stop.wait(seconds)
            return
        if self.wake.wait(seconds) and not self.stop.stopped:
            self.wake.clear()
            self.stop.wait(min(0.5, self.w.stable_s or 0.5))  # let a burst of events settle

    def _work(self, candidates: list[Candidate]) -> list[Work]:
        """Pending pairs of ready candidates in watch.order; logs each candidate's state when it changes."""
        names = {c.name for c in candidates}
        for gone in sorted(set(self._pending) - names):
            cand, evals = self._pending.pop(gone)
            self._skip_deleted(cand, evals, "deleted before it was evaluated")
        self.states.forget(names)
        work: list[Work] = []
        for cand in candidates:
            self.states.log(cand, self.ledger)
            if cand.state != READY:
                continue
            if cand.step is not None and cand.step < self.w.from_step:
                continue
            todo = [ev for ev in plan_evaluations(cand.step, self.w)
                    if self.ledger.status(cand.identity, ev.name) not in FINAL]
            if todo:
                self._pending[cand.name] = (cand, todo)
            else:
                self._pending.pop(cand.name, None)
            work += [Work(cand, ev) for ev in todo]
        newest = self.w.order == "newest"
        work.sort(key=lambda item: (-(item.cand.step or 0) if newest else (item.cand.step or 0), item.cand.name))
        return work

    def _skip_deleted(self, cand: Candidate, evals: list[Evaluation], how: str) -> None:
        """A checkpoint that went away: its open pairs are recorded skipped (final; a new copy is a new identity)."""
        for ev in evals:
            if self.ledger.status(cand.identity, ev.name) not in FINAL:
                self.ledger.record(cand.identity, ev.name, SKIPPED, ckpt=cand.url, step=cand.step, error=how)
            self.attempts.deferred.pop(pair_key(cand.identity, ev.name), None)
        log.warning("skipped %s (step %s): %s", cand.url, cand.step, how)

    # ------------------------------------------------------------------------------------------ one pair

    def _evaluate(self, work: Work) -> None:
        """One pair: nothing when it is settled elsewhere, else one attempt and what its outcome means."""
        if self._settled_elsewhere(work):
            return
        attempt = self.attempts.begin(work)
        if attempt is None:
            return
        t0 = time.monotonic()
        self._attempt(attempt)
        if attempt.outcome is Outcome.FAILED and not self.discovery.still_there(work.cand):
            # deleted under us: the error is a symptom, not a failure
            tag(attempt.run, {"watch_result": "skipped: checkpoint deleted during the evaluation"})
            self._skip_deleted(work.cand, self._pending.pop(work.cand.name, (work.cand, [work.evaluation]))[1],
                               f"deleted during its {work.evaluation.name} evaluation")
            return
        self.attempts.settle(attempt)
        if attempt.outcome is Outcome.DONE:
            self._finished(attempt, time.monotonic() - t0)

    def _settled_elsewhere(self, work: Work) -> bool:
        """True when the pair needs no attempt now: MLflow has it FINISHED (recorded done), the store does not
        answer (the pair waits for it, no attempt burnt), or the checkpoint is gone (recorded skipped)."""
        cand, ev = work.cand, work.evaluation
        if self.view is not None:
            try:
                run_id = self.view.finished_run(cand.identity, ev.name)
            except Exception as exc:  # noqa: BLE001 - store down: wait, do not burn an attempt
                if not self._store_down:  # once per outage, not once per poll
                    log.warning("MLflow store unreachable (%s: %s): evaluations wait for it (checked every %gs)",
                                type(exc).__name__, str(exc)[:200], self.w.interval)
                self._store_down = True
                self.attempts.defer(work.key, self.w.interval)
                return True
            if self._store_down:
                log.info("MLflow store reachable again: resuming")
                self._store_down = False
            if run_id:
                log.info("skipped %s: already done (MLflow run %s)", work, run_id)
                self.ledger.record(cand.identity, ev.name, DONE, run_id=run_id, ckpt=cand.url, step=cand.step)
                return True
        if not self.discovery.still_there(cand):
            self._skip_deleted(cand, self._pending.pop(cand.name, (cand, [ev]))[1], "deleted before its turn")
            return True
        return False

    def _finished(self, attempt: Attempt, seconds: float) -> None:
        cand, result = attempt.work.cand, attempt.result or {}
        if all(self.ledger.status(cand.identity, e.name) in FINAL for e in plan_evaluations(cand.step, self.w)):
            self._pending.pop(cand.name, None)
        self.progress.log_curve(result, cand.step)
        self._log_signal()
        log.info("done %s in %.1fs: %s", attempt.work, seconds, headline(result))
        if attempt.run is not None:
            print_view(attempt.run, metrics=table_metrics(result), command=False)

    def _log_signal(self) -> None:
        """signal/... over the watched series on the summary run, the best checkpoint registered (best effort)."""
        if self.progress.summary_run is None:
            return
        try:
            from ckpteval.series import watcher_signal

            watcher_signal(self.ledger.entries, self.cfg, self.progress.summary_run, self.watch_dir)
        except Exception as exc:  # noqa: BLE001 - best effort, as the heartbeat
            log.warning("could not log the signal summary to the watcher run: %s", exc)

    def _attempt(self, attempt: Attempt) -> None:
        """Run the attempt's evaluation through the job runner (`ckpteval.job.run_tracked`: its run, results.json,
        the outbox) and fill in its outcome; exceptions end here, as outcomes."""
        cand, ev = attempt.work.cand, attempt.work.evaluation
        job = Job(dist=self.dist, out_dir=self.out_root / cand.name / ev.name, step=cand.step)
        self.lock.status = {"current": str(attempt.work)}
        self.stop.doing = f"the watcher (aborting {attempt.work})"
        try:
            attempt.result = self._run_tracked(attempt, job)
            attempt.outcome = Outcome.DONE
            if job.run.active:  # lm-eval outputs are run artifacts now: keep only results.json here
                shutil.rmtree(job.out_dir / "lm_eval", ignore_errors=True)
        except JobStopped:
            attempt.outcome = Outcome.STOPPED
        except TrackingOutbox as exc:  # the run ended FINISHED, into the outbox
            attempt.outcome, attempt.error = Outcome.OUTBOX, exc
        except TrackingError as exc:  # the store went away: not the checkpoint's fault, not an attempt
            attempt.outcome, attempt.error = Outcome.TRACKING, exc
        except ClaimedElsewhere as exc:  # another watcher took it first: withdraw our claim run
            attempt.outcome, attempt.error = Outcome.CLAIMED, exc
            if job.run.active:
                self.view.withdraw(job.run.run_id)
        except Exception as exc:  # noqa: BLE001 - any failure of one checkpoint: record, retry, move on
            attempt.outcome, attempt.error = Outcome.FAILED, exc
        finally:
            attempt.run = job.run if job.run.active else None
            self.lock.status = {}
            self.stop.doing = "the watcher"
            shutil.rmtree(self.scratch, ignore_errors=True)
            gc.collect()
            _empty_device_cache()

    def _run_tracked(self, attempt: Attempt, job: Job) -> dict[str, Any]:
        cand, ev = attempt.work.cand, attempt.work.evaluation
        hcfg = None
        resolved = dict(self.resolved)
        if ev.kind == "harness":
            # Conversions (harness.backend=subprocess on a DCP/GGUF checkpoint) go to a scratch dir removed after
            # every evaluation: the watcher never evaluates an identity twice, so a cache would only grow.
            hcfg = harness_config(self.cfg, ev) or OmegaConf.merge(self.cfg.harness, {})
            hcfg.cache_dir = str(self.scratch / "converted")
            resolved["harness"] = OmegaConf.to_container(hcfg, resolve=True)
        tags = {"mode": "watch", "evaluation": ev.name, "ckpt": cand.url, "step": cand.step,
                "ckpt_identity": cand.identity, "watch_dir": self.watch_dir, "attempt": attempt.number}
        evaluate = self.evaluations[ev.kind]

        def run(j: Job) -> dict[str, Any]:
            if self.view is not None and j.run.active:  # claim, then check: the server arbitrates
                others = self.view.other_claims(cand.identity, ev.name, j.run.run_id, self.w.lock_stale_s)
                if others:
                    raise ClaimedElsewhere(others[0])
            with self.stop.interruptible():
                result = evaluate(self.cfg, j, path, harness_cfg=hcfg)
            if j.step is None:
                j.step = cand.step
            return result

        with self.discovery.local_copy(cand, self.downloads) as path:
            return run_tracked(self.cfg, run, job, run_name=watch_run_name(ev.name, path, cand.step), tags=tags,
                               params=flatten(resolved), title=f"watch {ev.name} {cand.name}")

    def _replay_outbox(self) -> None:
        """Results of evaluations whose tracking failed, sent to the store now that it may be back."""
        from ckpteval import tracking

        if not self.cfg.tracking.enabled:
            return
        try:
            sent = tracking.replay_outbox(self.cfg.tracking)
        except TrackingError as exc:
            if not self._outbox_down:
                log.warning("tracking store still unreachable, outbox kept: %s", str(exc)[:300])
            self._outbox_down = True
            return
        self._outbox_down = False
        if sent:
            log.info("outbox: %d run(s) sent to the tracking store", sent)

    # ------------------------------------------------------------------------------------------ progress

    def _publish(self, force: bool = False) -> None:
        self.progress.publish(self.ledger, len(self._pending), force)

    def _summary(self) -> dict[str, Any]:
        return {**self.progress.counts(self.ledger, len(self._pending)), "watch/stopped_by": self.stop.reason or "done"}


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()

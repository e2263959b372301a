"""The watcher loop: look, pick the next (checkpoint, evaluation) pair, evaluate it in its own MLflow run, repeat.

Decisions are logged one line each (found / waiting / skipped / started / done / failed), a heartbeat line and
the summary "watcher" run's metrics show progress, and SIGTERM/SIGINT stop it cleanly: between evaluations it
exits at once; inside one it aborts it (that run ends KILLED, nothing is marked done, the attempt is not
counted) and exits. After every evaluation the loop looks again, so `watch.order=newest` lets a checkpoint that
arrived meanwhile jump the queue.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ckpteval.errors import CkptEvalError, TrackingError
from ckpteval.tracking import flatten, mlflow_run, print_view
from ckpteval.tracking.naming import table_metrics, watch_run_name, watcher_run_name
from ckpteval.watch.discovery import READY, UNSTABLE, Candidate, Discovery
from ckpteval.watch.ledger import DONE, FAILED, SKIPPED, STARTED, Ledger, MlflowView, lock_for, pair_key
from ckpteval.watch.plan import Evaluation, harness_config, plan_evaluations, validate_plan

log = logging.getLogger("ckpteval.watch")
ORDERS = ("oldest", "newest")


class ClaimedElsewhere(Exception):
    """Another watcher's run owns this (checkpoint, evaluation) pair on the shared store (two watchers on one dir
    whose lock could not exclude each other, e.g. an object store without atomic create): step back."""


class StopRequested(KeyboardInterrupt):
    """Raised inside an evaluation on SIGTERM/SIGINT: a KeyboardInterrupt, so no `except Exception` swallows it
    and `tracking.mlflow_run` ends the run KILLED."""


@dataclass
class Work:
    cand: Candidate
    evaluation: Evaluation

    @property
    def key(self) -> str:
        return pair_key(self.cand.identity, self.evaluation.name)


def default_state_dir(cfg) -> Path:
    if cfg.watch.state_dir:
        return Path(cfg.watch.state_dir).expanduser()
    if "://" in cfg.watch.dir and not cfg.watch.dir.startswith("file://"):
        digest = hashlib.sha256(cfg.watch.dir.encode()).hexdigest()[:12]
        return Path(cfg.paths.outputs) / "watch" / f"state_{digest}"
    local = cfg.watch.dir.removeprefix("file://")
    return Path(local).expanduser() / ".ckpteval_watch"


def validate(cfg) -> None:
    w = cfg.watch
    if not w.dir:
        raise CkptEvalError("mode=watch needs the directory to watch: add watch.dir=PATH (or an fsspec URL such as "
                            "s3://bucket/run1)")
    if w.order not in ORDERS:
        raise CkptEvalError(f"watch.order={w.order!r} is not one of {ORDERS}: use watch.order=oldest or newest")
    if w.interval <= 0 or w.stable_s < 0 or w.backoff_s < 0 or w.lock_stale_s <= 0:
        raise CkptEvalError("watch.interval and watch.lock_stale_s must be > 0, watch.stable_s and "
                            "watch.backoff_s >= 0")
    if w.max_attempts < 1:
        raise CkptEvalError(f"watch.max_attempts={w.max_attempts}: use 1 or more")
    validate_plan(w)
    if "harness" in w.plan or (w.heavy.tasks and w.heavy.every_n_steps > 0):
        try:
            from ckpteval.modes.harness import evaluate_checkpoint_harness  # noqa: F401
        except ImportError as exc:
            raise CkptEvalError(f"watch.plan/watch.heavy need the harness evaluation, which cannot be imported "
                                f"({exc}): pip install 'ckpteval[harness]', or use watch.plan=[loss]") from None
    if "loss" in w.plan and cfg.data.kind == "local" and not cfg.data.demo:
        path = OmegaConf.select(cfg, "data.dataset_path", throw_on_missing=False, default=None)
        if path in (None, "???") or not Path(str(path)).expanduser().exists():
            raise CkptEvalError(f"watch.plan includes loss but data.dataset_path={path} does not exist: point it "
                                "at the held-out token shards (data.dataset_path=DIR)")


class Watcher:
    def __init__(self, cfg, dist, out_root: Path):
        validate(cfg)
        self.cfg, self.w, self.dist, self.out_root = cfg, cfg.watch, dist, Path(out_root)
        self.discovery = Discovery(self.w.dir, float(self.w.stable_s), ckpt_config=cfg.get("ckpt_config"))
        self.watch_dir = self.discovery.url_of("").rstrip("/")
        self.state_dir = default_state_dir(cfg)
        self.downloads = self.state_dir / "downloads"
        self.scratch = self.state_dir / "scratch"
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.stop_reason: str | None = None
        self._in_eval = False
        self.deferred: dict[str, float] = {}  # pair key -> clock time of the next attempt
        self.session = {"evaluated": 0, "failed": 0, "retried": 0}
        self.polls = 0
        self.latest_step: int | None = None
        self.current: str | None = None
        self._known: dict[str, tuple[str, str]] = {}  # candidate name -> (state, reason) last logged
        self._pending: dict[str, tuple[Candidate, list[Evaluation]]] = {}  # name -> ready, not yet done
        self._last_beat = 0.0
        self._store_down = False  # MLflow unreachable at the last check (logged once per outage)
        self._outbox_down = False  # the outbox replay found the store still away (logged once)
        self.view: MlflowView | None = None
        self.resolved = OmegaConf.to_container(cfg, resolve=True)

    # ------------------------------------------------------------------------------------------ lifecycle

    def run(self) -> dict[str, Any]:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CkptEvalError(f"cannot create the watch state dir {self.state_dir} ({exc}): set "
                                "watch.state_dir=DIR to a writable place") from None
        self.ledger = Ledger(self.state_dir)
        # the lock belongs to the watched dir, not to this state dir: one watcher per watch.dir (ledger.lock_for)
        self.lock = lock_for(self.watch_dir, self.discovery.local, self.w.lock_stale_s, self.w.heartbeat_s)
        with self._signals():
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
        the evaluations' own outages are handled per pair (`_tracking_failed`)."""
        try:
            with mlflow_run(self.cfg.tracking, enabled=True, run_name=watcher_run_name(self.watch_dir),
                            tags={"mode": "watch", "evaluation": "watcher", "watch_dir": self.watch_dir,
                                  "ckpt": self.watch_dir},
                            params=flatten(self.resolved)) as summary_run:
                self.summary_run = summary_run
                if self.cfg.tracking.enabled:
                    print_view(summary_run, self.cfg.tracking)  # where the curves will appear
                self._loop()
                summary_run.set_tags({"stopped_by": self.stop_reason or "done"})
                self._publish(force=True)
        except TrackingError as exc:
            log.warning("the watcher's summary run could not be ended on the tracking store (%s): it waits in the "
                        "outbox for the next replay", str(exc)[:300])

    def _acquire_lock(self) -> bool:
        waiting_logged = False
        while not self.stop.is_set():
            if self.lock.acquire():
                log.info("watching %s (state %s, plan %s%s, order %s, every %gs)", self.watch_dir, self.state_dir,
                         list(self.w.plan), self._heavy_text(), self.w.order, self.w.interval)
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
            synced = 0
            for key, run_id in self.view.finished_pairs(self.watch_dir).items():
                if self.ledger.entries.get(key, {}).get("status") != DONE:
                    identity, _, evaluation = key.partition("/")
                    self.ledger.entries[key] = {**self.ledger.entries.get(key, {}), "status": DONE,
                                                "identity": identity, "evaluation": evaluation, "run_id": run_id,
                                                "time": time.time()}
                    synced += 1
            if synced:
                self.ledger.save()
                log.info("ledger: %d finished evaluation(s) recovered from MLflow", synced)
        reset = 0
        for entry in self.ledger.entries.values():
            if entry.get("status") == FAILED and self.w.retry_failed:
                entry.update(status=STARTED, attempts=0)
                reset += 1
        if reset:
            self.ledger.save()
            log.info("watch.retry_failed: %d failed evaluation(s) get another %d attempt(s)", reset,
                     self.w.max_attempts)

    @contextmanager
    def _signals(self) -> Iterator[None]:
        def handler(signum, _frame):
            name = signal.Signals(signum).name
            first = not self.stop.is_set()
            self.stop_reason = self.stop_reason or name
            self.stop.set()
            self.wake.set()
            if first:
                log.warning("%s: stopping%s", name, f" (aborting {self.current})" if self._in_eval else "")
            if self._in_eval:
                self._in_eval = False
                raise StopRequested(name)

        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: a closed terminal, a reload
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (embedded use): no handlers, stop() still works
            pass
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    @contextmanager
    def _interruptible(self) -> Iterator[None]:
        if self.stop.is_set():
            raise StopRequested(self.stop_reason or "stop")
        self._in_eval = True
        try:
            yield
        finally:
            self._in_eval = False

    # ------------------------------------------------------------------------------------------ loop

    def _loop(self) -> None:
        dir_missing_logged = False
        while not self.stop.is_set():
            if self.lock.lost:
                raise CkptEvalError(f"another watcher took over {self.lock.path} (this one was judged stale): "
                                    "raise watch.lock_stale_s if evaluations block the heartbeat")
            if self.w.max_polls and self.polls >= self.w.max_polls:
                log.info("watch.max_polls=%d reached: stopping", self.w.max_polls)
                return
            self.polls += 1
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
            ready = [item for item in work if self.deferred.get(item.key, 0.0) <= now]
            if ready:
                self._evaluate(ready[0])
                continue  # look again before the next pair: new arrivals, deletions, order=newest
            waits = [t - now for item in work if (t := self.deferred.get(item.key)) is not None]
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
        if self.wake.wait(seconds) and not self.stop.is_set():
            self.wake.clear()
            self.stop.wait(min(0.5, self.w.stable_s or 0.5))  # let a burst of events settle

    def _work(self, candidates: list[Candidate]) -> list[Work]:
        """Pending pairs of ready candidates in watch.order; logs each candidate's state when it changes."""
        names = {c.name for c in candidates}
        for gone in sorted(set(self._pending) - names):
            cand, evals = self._pending.pop(gone)
            self._skip_deleted(cand, evals, "deleted before it was evaluated")
        for gone in set(self._known) - names:
            del self._known[gone]
        work: list[Work] = []
        for cand in candidates:
            self._log_state(cand)
            if cand.state != READY:
                continue
            if cand.step is not None and cand.step < self.w.from_step:
                continue
            todo = [ev for ev in plan_evaluations(cand.step, self.w)
                    if self.ledger.status(cand.identity, ev.name) not in (DONE, FAILED, SKIPPED)]
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
            if self.ledger.status(cand.identity, ev.name) not in (DONE, FAILED, SKIPPED):
                self.ledger.record(cand.identity, ev.name, SKIPPED, ckpt=cand.url, step=cand.step, error=how)
            self.deferred.pop(pair_key(cand.identity, ev.name), None)
        log.warning("skipped %s (step %s): %s", cand.url, cand.step, how)

    def _log_state(self, cand: Candidate) -> None:
        """One line per change of state: reasons are compared with their numbers blanked, so "truncated (N
        bytes)" growing poll after poll is still the same state."""
        before = self._known.get(cand.name)
        reason = re.sub(r"\d+(\.\d+)?", "#", cand.reason) if cand.state != UNSTABLE else ""
        now = (cand.state, reason)
        if before == now:
            return
        self._known[cand.name] = now
        if cand.step is not None and cand.step < self.w.from_step:
            if before is None:
                log.info("skipped %s (step %s): before watch.from_step=%d", cand.url, cand.step, self.w.from_step)
            return
        if cand.state == READY:
            evals = [ev.name for ev in plan_evaluations(cand.step, self.w)]
            done = [e for e in evals if self.ledger.status(cand.identity, e) == DONE]
            failed = [e for e in evals if self.ledger.status(cand.identity, e) == FAILED]
            if len(done) + len(failed) == len(evals):
                log.info("skipped %s (step %s): already evaluated (%s)", cand.url, cand.step,
                         ", ".join([f"{e} done" for e in done] + [f"{e} failed" for e in failed]) or "empty plan")
            else:
                log.info("found %s (step %s): complete; plan %s%s", cand.url, cand.step, evals,
                         f" ({', '.join(done + failed)} already recorded)" if done or failed else "")
        elif cand.state == UNSTABLE:
            if before is not None:  # first look at a checkpoint is always "unstable": no news
                log.info("found %s (step %s): complete, waiting %gs for its files to stop changing", cand.url,
                         cand.step, self.w.stable_s)
        else:
            log.info("waiting for %s (step %s): %s", cand.url, cand.step, cand.reason)

    # ------------------------------------------------------------------------------------------ one pair

    def _evaluate(self, item: Work) -> None:
        cand, ev = item.cand, item.evaluation
        what = f"{ev.name} on {cand.url} (step {cand.step})"
        if self.view is not None:
            try:
                run_id = self.view.finished_run(cand.identity, ev.name)
            except Exception as exc:  # noqa: BLE001 - store down: wait, do not burn an attempt
                if not self._store_down:  # once per outage, not once per poll
                    log.warning("MLflow store unreachable (%s: %s): evaluations wait for it (checked every %gs)",
                                type(exc).__name__, str(exc)[:200], self.w.interval)
                self._store_down = True
                self.deferred[item.key] = time.monotonic() + self.w.interval
                return
            if self._store_down:
                log.info("MLflow store reachable again: resuming")
                self._store_down = False
            if run_id:
                log.info("skipped %s: already done (MLflow run %s)", what, run_id)
                self.ledger.record(cand.identity, ev.name, DONE, run_id=run_id, ckpt=cand.url, step=cand.step)
                return
        if not self.discovery.still_there(cand):
            self._skip_deleted(cand, self._pending.pop(cand.name, (cand, [ev]))[1], "deleted before its turn")
            return
        previous = self.ledger.get(cand.identity, ev.name) or {}
        attempt = int(previous.get("attempts", 0)) + 1
        if attempt > self.w.max_attempts:  # earlier processes died during every attempt (e.g. killed for memory)
            self._give_up(item, attempt - 1, "the watcher process died during every attempt", None)
            return
        self.ledger.record(cand.identity, ev.name, STARTED, attempts=attempt, ckpt=cand.url, step=cand.step)
        self.current = what
        self.lock.status = {"current": what}
        log.info("started %s, attempt %d/%d", what, attempt, self.w.max_attempts)
        t0 = time.monotonic()
        run = None
        try:
            result, run = self._run_one(cand, ev, attempt)
        except StopRequested:
            log.warning("aborted %s: not marked done; it runs again on the next start", what)
            self.ledger.restore(cand.identity, ev.name, previous)
            return
        except TrackingError as exc:  # the store went away: not the checkpoint's fault, not an attempt
            self._tracking_failed(item, previous, exc)
            return
        except ClaimedElsewhere as exc:  # another watcher took it first: not an attempt; look again later
            log.info("skipped %s for now: another watcher's run %s has it", what, exc)
            self.ledger.restore(cand.identity, ev.name, previous)
            self.deferred[item.key] = time.monotonic() + self.w.interval * (0.5 + random.random())
            return
        except Exception as exc:  # noqa: BLE001 - any failure of one checkpoint: record, retry, move on
            run = getattr(exc, "_watch_run", None)
            if not self.discovery.still_there(cand):  # deleted under us: the error is a symptom, not a failure
                _tag(run, {"watch_result": "skipped: checkpoint deleted during the evaluation"})
                self._skip_deleted(cand, self._pending.pop(cand.name, (cand, [ev]))[1],
                                   f"deleted during its {ev.name} evaluation")
                return
            self._failed(item, attempt, exc, run)
            return
        finally:
            self.current = None
            self.lock.status = {}
            gc.collect()
            _empty_device_cache()
        self.deferred.pop(item.key, None)
        metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.ledger.record(cand.identity, ev.name, DONE, run_id=run.run_id if run else None, metrics=metrics,
                           error=None)
        self.session["evaluated"] += 1
        if all(self.ledger.status(cand.identity, e.name) in (DONE, FAILED, SKIPPED)
               for e in plan_evaluations(cand.step, self.w)):
            self._pending.pop(cand.name, None)
        self.latest_step = max(self.latest_step or 0, cand.step or 0)
        self._log_curve(metrics, cand.step)
        log.info("done %s in %.1fs: %s", what, time.monotonic() - t0, _key_metrics(result))
        if run is not None:
            print_view(run, metrics=table_metrics(result), command=False)

    def _run_one(self, cand: Candidate, ev: Evaluation, attempt: int) -> tuple[dict[str, Any], Any]:
        """One evaluation through the job runner (ckpteval.job.run_tracked): its run, results.json, outbox."""
        from ckpteval.job import Job, run_tracked

        hcfg = None
        resolved = dict(self.resolved)
        if ev.kind == "harness":
            # Conversions (harness.backend=subprocess on a DCP/GGUF checkpoint) go to a scratch dir removed after
            # every evaluation: the watcher never evaluates an identity twice, so a cache would only grow.
            hcfg = harness_config(self.cfg, ev) or OmegaConf.merge(self.cfg.harness, {})
            hcfg.cache_dir = str(self.scratch / "converted")
            resolved["harness"] = OmegaConf.to_container(hcfg, resolve=True)
        tags = {"mode": "watch", "evaluation": ev.name, "ckpt": cand.url, "step": cand.step,
                "ckpt_identity": cand.identity, "watch_dir": self.watch_dir, "attempt": attempt}
        out_dir = self.out_root / cand.name / ev.name
        job = Job(dist=self.dist, out_dir=out_dir, step=cand.step)

        def evaluate(j: Job) -> dict[str, Any]:
            if self.view is not None and j.run.active:  # claim, then check: the server arbitrates
                others = self.view.other_claims(cand.identity, ev.name, j.run.run_id, self.w.lock_stale_s)
                if others:
                    raise ClaimedElsewhere(others[0])
            with self._interruptible():
                result = self._call(ev, j, path, hcfg)
            if j.step is None:
                j.step = cand.step
            return result

        try:
            with self.discovery.local_copy(cand, self.downloads) as path:
                result = run_tracked(self.cfg, evaluate, job, run_name=watch_run_name(ev.name, path, cand.step),
                                     tags=tags, params=flatten(resolved), title=f"watch {ev.name} {cand.name}")
        except ClaimedElsewhere:
            if job.run.active:
                self.view.withdraw(job.run.run_id)
            raise
        except Exception as exc:
            exc._watch_run = job.run if job.run.active else None  # so the failure is tagged on its run
            raise
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
        if job.run.active:  # lm-eval outputs are run artifacts now: keep only results.json here
            shutil.rmtree(out_dir / "lm_eval", ignore_errors=True)
        return result, job.run

    def _call(self, ev: Evaluation, job, path: str, hcfg) -> dict[str, Any]:
        from ckpteval.job import evaluation_fn

        return evaluation_fn(ev.kind)(self.cfg, job, path, **({"harness_cfg": hcfg} if ev.kind == "harness" else {}))

    def _tracking_failed(self, item: Work, previous: dict[str, Any], exc: TrackingError) -> None:
        """The store went away during the pair's run: never a failed attempt of the checkpoint.

        If the evaluation finished, the job runner ended its run FINISHED in the outbox with its results: the
        pair is done (ledger), and `tracking.replay_outbox` (every poll) delivers it once the store answers, so
        it is neither lost nor evaluated again. Otherwise (the store was gone before the evaluation ended) the
        attempt is given back and the pair waits for the store."""
        cand, ev = item.cand, item.evaluation
        run = getattr(exc, "_watch_run", None)
        if _finished_in_outbox(run):
            self.deferred.pop(item.key, None)
            self.ledger.record(cand.identity, ev.name, DONE, run_id=run.run_id, tracking="outbox", error=None)
            self.session["evaluated"] += 1
            log.warning("done %s on %s (step %s), but the tracking store went away: run %s and its results wait in "
                        "the outbox and are sent when it answers again", ev.name, cand.url, cand.step, run.run_id)
            return
        self.ledger.restore(cand.identity, ev.name, previous)
        self.deferred[item.key] = time.monotonic() + self.w.interval
        log.warning("tracking store failed during %s on %s (step %s): %s; not counted as an attempt, it runs again "
                    "when the store answers", ev.name, cand.url, cand.step, str(exc)[:300])

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

    def _failed(self, item: Work, attempt: int, exc: BaseException, run) -> None:
        cand, ev = item.cand, item.evaluation
        error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, CkptEvalError):  # not a known user error: the traceback is what a bug report needs
            log.warning("traceback of %s on %s", ev.name, cand.url, exc_info=exc)
        if attempt >= self.w.max_attempts:
            self._give_up(item, attempt, error, run)
            return
        delay = self.w.backoff_s * 2 ** (attempt - 1)
        self.deferred[item.key] = time.monotonic() + delay
        self.ledger.record(cand.identity, ev.name, STARTED, attempts=attempt, error=error[:2000],
                           run_id=run.run_id if run else None)
        self.session["retried"] += 1
        _tag(run, {"watch_result": f"retry in {delay:g}s"})
        log.warning("attempt %d/%d of %s on %s (step %s) failed: %s; retrying in %gs", attempt, self.w.max_attempts,
                    ev.name, cand.url, cand.step, error[:500], delay)

    def _give_up(self, item: Work, attempts: int, error: str, run) -> None:
        cand, ev = item.cand, item.evaluation
        self.deferred.pop(item.key, None)
        self.ledger.record(cand.identity, ev.name, FAILED, attempts=attempts, error=error[:2000], ckpt=cand.url,
                           step=cand.step, run_id=run.run_id if run else None)
        self.session["failed"] += 1
        _tag(run, {"watch_result": "failed"})
        log.error("failed %s on %s (step %s) after %d attempt(s): %s; recorded failed, moving on (watch.retry_failed"
                  "=true retries it)", ev.name, cand.url, cand.step, attempts, error[:500])

    # ------------------------------------------------------------------------------------------ progress

    def _counts(self) -> dict[str, float]:
        return {"watch/done": self.ledger.count(DONE), "watch/failed": self.ledger.count(FAILED),
                "watch/pending": len(self._pending),
                "watch/evaluated": self.session["evaluated"], "watch/retries": self.session["retried"],
                "watch/polls": self.polls,
                **({"watch/latest_step": self.latest_step} if self.latest_step is not None else {})}

    def _publish(self, force: bool = False) -> None:
        """Heartbeat log line + summary-run metrics, at most every watch.heartbeat_s (and after each evaluation)."""
        now = time.monotonic()
        evaluated = self.session["evaluated"] + self.session["failed"]
        if not force and now - self._last_beat < self.w.heartbeat_s and evaluated == getattr(self, "_last_n", 0):
            return
        self._last_beat, self._last_n = now, evaluated
        counts = self._counts()
        log.info("heartbeat: %d done, %d failed, %d checkpoint(s) pending, %d evaluated this session",
                 counts["watch/done"], counts["watch/failed"], counts["watch/pending"], counts["watch/evaluated"])
        try:
            self.summary_run.log_metrics(counts, step=self.polls)
            self.summary_run.set_tags({"heartbeat": time.strftime("%Y-%m-%dT%H:%M:%S")})
        except Exception as exc:  # noqa: BLE001 - the summary run is best effort; evaluations carry the results
            log.warning("could not update the watcher run: %s", exc)

    def _log_curve(self, metrics: dict[str, float], step: int | None) -> None:
        """The watcher's summary run carries the eval curves: each evaluation's metrics at its checkpoint step."""
        if step is None or not hasattr(self, "summary_run"):
            return
        try:
            self.summary_run.log_metrics({k: v for k, v in metrics.items() if k not in ("step", "tokens_seen")},
                                         step=step)
            from ckpteval.series import watcher_signal  # signal/... over the watched series, best checkpoint registered

            watcher_signal(self.ledger.entries, self.cfg, self.summary_run, self.watch_dir)
        except Exception as exc:  # noqa: BLE001 - best effort, as the heartbeat
            log.warning("could not log the curve to the watcher run: %s", exc)

    def _summary(self) -> dict[str, Any]:
        counts = self._counts() if hasattr(self, "ledger") else {}
        return {**counts, "watch/stopped_by": self.stop_reason or "done"}


def _finished_in_outbox(run) -> bool:
    """True when `run` was ended FINISHED into the tracking outbox (the store was away at its end)."""
    import json

    if run is None or not getattr(run, "ended", False) or getattr(run, "outbox", None) is None:
        return False
    try:
        entry = json.loads(run.outbox.entry_path(run.run_id).read_text())
    except (OSError, ValueError):
        return False
    return (entry.get("end") or {}).get("status") == "FINISHED"


def _tag(run, tags: dict[str, Any]) -> None:
    if run is None:
        return
    try:
        run.set_tags(tags)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not tag MLflow run: %s", exc)


def _key_metrics(result: dict[str, Any], limit: int = 4) -> str:
    items = [(k, v) for k, v in result.items()
             if k not in ("step", "tokens_seen") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    preferred = sorted(items, key=lambda kv: (not kv[0].startswith("eval/loss"), "stderr" in kv[0]))
    return ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in preferred[:limit]) or "-"


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()

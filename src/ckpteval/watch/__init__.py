"""The unattended evaluator behind `mode=watch`: discovery (what is complete), plan (which evaluations), ledger
(what is done, exactly once, and the single-watcher lock), attempts (one try and its outcome, retries), progress
(log lines, heartbeat, the watcher's run), validation (settings, state dir) and service (the loop)."""

from ckpteval.watch.discovery import Candidate, Discovery
from ckpteval.watch.ledger import Ledger, MlflowView, WatchLock
from ckpteval.watch.plan import Evaluation, heavy_due, plan_evaluations
from ckpteval.watch.service import Watcher

__all__ = ["Candidate", "Discovery", "Evaluation", "Ledger", "MlflowView", "WatchLock", "Watcher", "heavy_due",
           "plan_evaluations"]

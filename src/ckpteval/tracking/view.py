"""The watcher's queries against MLflow: which (checkpoint, evaluation) pairs are FINISHED, and which runs a
dead watcher left RUNNING. (Moved here from watch/ledger.py: MLflow is called from tracking/ only.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ckpteval.errors import CkptEvalError


def pair_key(identity: str, evaluation: str) -> str:
    """The key of a (checkpoint identity, evaluation) pair, in MLflow's view and in the watcher's ledger."""
    return f"{identity}/{evaluation}"


@dataclass
class MlflowView:
    """The pairs MLflow knows as FINISHED, and cleanup of runs a dead watcher left RUNNING."""

    client: Any
    experiment_id: str

    @classmethod
    def open(cls, tracking_cfg) -> MlflowView:
        from ckpteval.tracking.store import open_client

        client, experiment_id, _ = open_client(tracking_cfg)
        return cls(client, experiment_id)

    def _search(self, filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1000,
                                           page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def finished_pairs(self, watch_dir: str) -> dict[str, str]:
        """{pair key: run_id} for every FINISHED evaluation run a watcher of `watch_dir` logged."""
        out = {}
        for run in self._search(f"tags.mode = 'watch' and tags.watch_dir = {_literal(watch_dir)} "
                                "and attributes.status = 'FINISHED'"):
            tags = run.data.tags
            if "ckpt_identity" in tags and "evaluation" in tags:
                out[pair_key(tags["ckpt_identity"], tags["evaluation"])] = run.info.run_id
        return out

    def finished_run(self, identity: str, evaluation: str) -> str | None:
        runs = self._search(f"tags.ckpt_identity = '{identity}' and tags.evaluation = {_literal(evaluation)} "
                            "and attributes.status = 'FINISHED'")
        return runs[0].info.run_id if runs else None

    def other_claims(self, identity: str, evaluation: str, own_run_id: str, stale_s: float) -> list[str]:
        """Runs of the same (checkpoint, evaluation) other than `own_run_id` that own it: FINISHED, or RUNNING and
        started less than `stale_s` ago (an older RUNNING one is a dead watcher's). Called after our own run
        exists: of two watchers racing, the one that created its run later always sees the earlier one."""
        import time

        now_ms = time.time() * 1000
        runs = self._search(f"tags.ckpt_identity = '{identity}' and tags.evaluation = {_literal(evaluation)}")
        return [r.info.run_id for r in runs if r.info.run_id != own_run_id and
                (r.info.status == "FINISHED" or
                 (r.info.status == "RUNNING" and now_ms - (r.info.start_time or 0) < stale_s * 1000))]

    def withdraw(self, run_id: str) -> None:
        """Delete a claim run that lost (it did no work; the UI and searches no longer show it)."""
        self.client.delete_run(run_id)

    def end_orphans(self, watch_dir: str) -> list[str]:
        """Runs of this watch dir still RUNNING when no other watcher holds the lock: their process died
        (SIGKILL, power loss). End them KILLED so the UI does not show them running forever."""
        ended = []
        for run in self._search(f"tags.watch_dir = {_literal(watch_dir)} and attributes.status = 'RUNNING'"):
            self.client.set_tag(run.info.run_id, "error", "the watcher process died during this run")
            self.client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
        return ended


def _literal(value: str) -> str:
    """An MLflow filter-string literal: single-quoted, or double-quoted when the value holds a single quote
    (MLflow's parser has no escapes)."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise CkptEvalError(f"watch.dir {value!r} holds both quote characters, which MLflow filters cannot express: "
                        "rename it or point watch.dir at a symlink")



"""One MLflow run's lifecycle, in one place.

Every job opens exactly one run (rank 0 only), logs the flattened resolved config as params, tags the run with
what was evaluated, and ends it FINISHED only when the job returned and everything reached the store; an
exception ends it FAILED with the error text as the ``error`` tag, an interrupt (Ctrl-C, SIGTERM, SIGHUP:
see ``ckpteval.job.stop_signals``) KILLED. The explicit ``MlflowClient`` is used instead of the fluent API:
no global active-run state, which the watcher (many runs per process) and sweeps (nested runs) need.

When the store fails mid-run the ``Run`` goes offline: it keeps every later write (and the one that failed) in
the outbox (``tracking/outbox.py``), the job finishes its work, and ``end()`` raises ``TrackingOutbox``
saying where the results wait. The next replay delivers them and ends the run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ckpteval.errors import CkptEvalError, TrackingError, TrackingOutbox
from ckpteval.tracking.outbox import Outbox, outbox_dir
from ckpteval.tracking.store import git_commit, open_client, tracking_error, ui_command

log = logging.getLogger("ckpteval.tracking")


class Run:
    """A handle to one MLflow run; every method is a no-op when tracking is off (or on non-zero ranks)."""

    def __init__(self, client=None, run_id: str | None = None, uri: str | None = None,
                 outbox: Outbox | None = None):
        self.client, self.run_id, self.uri, self.outbox = client, run_id, uri, outbox
        self._logged: dict[tuple[str, int], float] = {}  # a job's final report repeats in-loop metrics: log once
        self.offline: TrackingError | None = None  # the failure that sent this run's writes to the outbox
        self._entry: dict[str, Any] | None = None
        self.ended = False

    @property
    def active(self) -> bool:
        return self.run_id is not None

    # -- writes: straight to the store, or to the outbox once the store has failed
    def _send(self, kind: str, payload: Any, call, what: str) -> None:
        if self.offline is None:
            try:
                call()
                return
            except CkptEvalError:
                raise
            except Exception as exc:
                if self.outbox is None:
                    raise tracking_error(self.uri, what, exc) from exc
                self.offline = tracking_error(self.uri, what, exc)
                log.error("MLflow store %s failed while %s: this run's results go to the outbox %s",
                          self.uri, what, self.outbox.root)
        self._queue(kind, payload)

    def _queue(self, kind: str, payload: Any) -> None:
        if self._entry is None:
            self._entry = self.outbox.load_entry(self.uri, self.run_id)
        if kind == "artifact":
            payload = [str(self.outbox.stash_file(self.run_id, Path(payload[0]))), payload[1]]
        self._entry["ops"].append([kind, payload])
        self.outbox.save_entry(self._entry)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now, step = get_current_time_millis(), int(step or 0)
        items = []
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            key = _metric_key(key)
            if self._logged.get((key, step)) != float(value):
                self._logged[(key, step)] = float(value)
                items.append((key, float(value), now, step))
        for i in range(0, len(items), 1000):
            chunk = items[i:i + 1000]
            self._send("metrics", chunk, lambda c=chunk: self.client.log_batch(
                self.run_id, metrics=[Metric(*m) for m in c]), "logging metrics")

    def log_params(self, params: Mapping[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = {k: str(v)[:6000] for k, v in params.items()}
        keys = list(items)
        for i in range(0, len(keys), 100):
            chunk = {k: items[k] for k in keys[i:i + 100]}
            self._send("params", chunk, lambda c=chunk: self.client.log_batch(
                self.run_id, params=[Param(k, v) for k, v in c.items()]), "logging params")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        tags = {k: str(v) for k, v in tags.items() if v is not None}
        keys = list(tags)
        for i in range(0, len(keys), 100):  # one write per 100 tags (MLflow's batch limit), not one per tag
            chunk = {k: tags[k] for k in keys[i:i + 100]}
            self._send("tags", chunk, lambda c=chunk: self.client.log_batch(
                self.run_id, tags=[RunTag(k, v) for k, v in c.items()]), "setting tags")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not self.active or not path.exists():
            return

        def call():
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

        self._send("artifact", [str(path), artifact_path], call, f"uploading {path.name}")

    # -- the end
    def end(self, status: str, error: str | None = None, results: tuple[Path, Path] | None = None) -> None:
        """End the run; when the store is (or goes) away, the outbox holds the end for the next replay.

        `results` = (staged results.json, its destination): moved into place once the run is FINISHED."""
        if not self.active or self.ended:
            return
        self.ended = True
        if self.offline is None:
            try:
                if error:
                    self.client.set_tag(self.run_id, "error", error[:5000])
                self.client.set_terminated(self.run_id, status)
                if self.outbox is not None:
                    self.outbox.clear_running(self.run_id)
                return
            except Exception as exc:
                if self.outbox is None:
                    raise tracking_error(self.uri, f"ending the run {status}", exc) from exc
                self.offline = tracking_error(self.uri, f"ending the run {status}", exc)
        if self._entry is None:
            self._entry = self.outbox.load_entry(self.uri, self.run_id)
        self._entry["end"] = {"status": status, "error": error}
        if results is not None and status == "FINISHED":
            kept = self.outbox.stash_file(self.run_id, results[0])
            self._entry["results"] = {"src": str(kept), "dest": str(results[1])}
        path = self.outbox.save_entry(self._entry)
        if status == "FINISHED":
            raise TrackingOutbox(f"{self.offline}: the evaluation finished and its results are kept in {path}; "
                                 f"they are sent, and the run ended, when the store answers again (on the next "
                                 f"job's start, by the watcher, or now with: python run.py mode=replay)",
                                 run_id=self.run_id)


def _metric_key(key: str) -> str:
    """MLflow keys allow [A-Za-z0-9_-./ ]; lm-eval metric names like 'acc,none' need sanitizing."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def _run_tags(tracking_cfg, run_name: str, tags: Mapping[str, Any]) -> dict[str, str]:
    all_tags = {"mlflow.runName": run_name, **{k: str(v) for k, v in tags.items() if v is not None}}
    if tracking_cfg.parent_run_id:
        all_tags["mlflow.parentRunId"] = tracking_cfg.parent_run_id
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    all_tags.update({k: str(v) for k, v in (tracking_cfg.tags or {}).items()})
    return all_tags


def open_run(tracking_cfg, run_name: str, tags: Mapping[str, Any]) -> Run:
    """Create the run (and its running marker, so a SIGKILL'd job's run is ended on a later start)."""
    client, experiment_id, uri = open_client(tracking_cfg)
    try:
        mlrun = client.create_run(experiment_id, run_name=run_name, tags=_run_tags(tracking_cfg, run_name, tags))
    except Exception as exc:  # noqa: BLE001
        raise CkptEvalError(f"{tracking_error(uri, 'creating the run', exc)}: check that tracking.uri={uri} "
                            "answers and is writable") from None
    outbox = Outbox(outbox_dir(tracking_cfg))
    try:
        outbox.mark_running(uri, mlrun.info.run_id, run_name)
    except OSError as exc:
        client.set_terminated(mlrun.info.run_id, "FAILED")
        raise CkptEvalError(f"cannot write the tracking outbox {outbox.root} ({exc.strerror}): set "
                            "tracking.outbox=DIR to a writable place") from None
    return Run(client, mlrun.info.run_id, uri, outbox)


@contextmanager
def mlflow_run(tracking_cfg, *, enabled: bool, run_name: str, tags: Mapping[str, Any],
               params: Mapping[str, str] | None = None) -> Iterator[Run]:
    """Open a run, yield it, and end it FAILED (error tag) / KILLED (interrupt) when the block raises.

    A block that returns normally ends it FINISHED unless the caller already ended it (``Run.end``, used by the
    job runner to move results.json into place only after the run is FINISHED)."""
    if not (enabled and tracking_cfg.enabled):
        yield Run()
        return
    run = open_run(tracking_cfg, run_name, tags)
    try:
        if params:
            run.log_params(params)
        yield run
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            run.end(status, f"{exc.__class__.__name__}: {exc}")
        except Exception as end_exc:  # noqa: BLE001 - the job's own error is the one to report
            log.warning("could not mark MLflow run %s %s: %s", run.run_id, status, end_exc)
        raise
    run.end("FINISHED")


def print_view(run: Run, tracking_cfg=None, metrics: list[str] | None = None, command: bool = True,
               label: str = "") -> None:
    """The line(s) a mode prints next to its results path: `MLflow: <label>` with, for a local store, the
    `mlflow ui` command (`command`: once per process), then `View:` and the experiment's curves (the chart tab,
    Model-training view, eval sections first). `metrics` go into the experiment's saved view first, as columns."""
    from ckpteval.tracking.naming import publish_view, view_links
    from ckpteval.tracking.store import is_remote, resolve_tracking_uri

    uri = run.uri if run.active else resolve_tracking_uri(tracking_cfg.uri) if tracking_cfg is not None else None
    charts = None
    if run.active and run.offline is None:  # else no run, or its store is away: nothing to link to yet
        try:
            if metrics:
                publish_view(run, metrics)
            charts = view_links(run)[1]
        except Exception as exc:  # noqa: BLE001 - a link is a convenience: never fail the job for it
            log.warning("could not build the MLflow link for run %s: %s", run.run_id, exc)
    first = label
    if command and uri and not is_remote(uri):
        first += f"{'; ' if label else ''}{ui_command(uri)}" + ("  (then open the View link)" if charts else "")
    if first:
        print(f"MLflow: {first}", flush=True)
    if charts:
        print(f"View: {charts}", flush=True)

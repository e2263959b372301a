"""MLflow run lifecycle in one place.

Every job opens exactly one run (rank 0 only), logs the flattened resolved config as params, tags the run
with what was evaluated, and ends it FINISHED only when the job returned; any exception ends it FAILED with
the error text as the ``error`` tag (KILLED for Ctrl-C/SIGTERM), so a run that looks finished always holds
complete results. The explicit ``MlflowClient`` is used instead of the fluent API: no global active-run state,
which the watcher (many runs per process) and sweeps (nested runs) need.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from ckpteval.errors import CkptEvalError

log = logging.getLogger(__name__)


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite path absolute (so every rank, sweep job and `mlflow ui` agree) and create its dir."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    if uri.startswith(prefix):
        Path(uri[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def ui_command(uri: str) -> str:
    """The command that shows this store in the MLflow UI."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast, before any work, when a remote tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            resp.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CkptEvalError(
            f"tracking server {uri} is unreachable ({reason}): start it (mlflow server --host 0.0.0.0 --port 5000 "
            f"--backend-store-uri sqlite:///mlflow.db), fix tracking.uri, or log locally with "
            f"tracking.uri=sqlite:///outputs/mlflow.db"
        ) from None


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"eval.steps": "20", ...}; lists and None rendered as JSON so params stay comparable."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def git_commit() -> str | None:
    """The commit of the ckpteval checkout, when it is one (tags runs with the code that produced them)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Run:
    """A handle to one MLflow run; every method is a no-op when tracking is off (or on non-zero ranks)."""

    def __init__(self, client=None, run_id: str | None = None, uri: str | None = None):
        self.client, self.run_id, self.uri = client, run_id, uri
        self._logged: dict[tuple[str, int], float] = {}  # a job's final report repeats in-loop metrics: log once

    @property
    def active(self) -> bool:
        return self.run_id is not None

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
                items.append(Metric(key, float(value), now, step))
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_params(self, params: Mapping[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            if self.active and value is not None:
                self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not self.active or not path.exists():
            return
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)


def _metric_key(key: str) -> str:
    """MLflow keys allow [A-Za-z0-9_-./ ]; lm-eval metric names like 'acc,none' need sanitizing."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def open_client(tracking_cfg):
    """Resolve the store, check it answers, and return (client, experiment_id, uri)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(tracking_cfg.timeout_s, 1))))
    uri = resolve_tracking_uri(tracking_cfg.uri)
    check_reachable(uri, tracking_cfg.timeout_s)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(tracking_cfg.experiment)
        if exp is not None:
            return client, exp.experiment_id, uri
        return client, client.create_experiment(tracking_cfg.experiment, _artifact_location(tracking_cfg, uri)), uri
    except Exception as exc:  # mlflow raises many types for a bad store; one clear line for all of them
        if isinstance(exc, CkptEvalError):
            raise
        raise CkptEvalError(f"cannot open the MLflow store {uri}: {exc.__class__.__name__}: {str(exc)[:300]}; "
                            f"check tracking.uri") from None


def _artifact_location(tracking_cfg, uri: str) -> str | None:
    if tracking_cfg.artifact_location:
        return tracking_cfg.artifact_location
    if uri.startswith("sqlite:///"):  # keep artifacts beside the db, not in ./mlruns of whatever cwd
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


@contextmanager
def mlflow_run(tracking_cfg, *, enabled: bool, run_name: str, tags: Mapping[str, Any],
               params: Mapping[str, str] | None = None) -> Iterator[Run]:
    """Open a run, yield it, and end it FINISHED / FAILED (error tag) / KILLED (interrupt)."""
    if not (enabled and tracking_cfg.enabled):
        yield Run()
        return
    client, experiment_id, uri = open_client(tracking_cfg)
    all_tags = {"mlflow.runName": run_name, **{k: str(v) for k, v in tags.items() if v is not None}}
    if tracking_cfg.parent_run_id:
        all_tags["mlflow.parentRunId"] = tracking_cfg.parent_run_id
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    all_tags.update(tracking_cfg.tags or {})
    mlrun = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run = Run(client, mlrun.info.run_id, uri)
    try:
        if params:
            run.log_params(params)
        yield run
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        _end_quietly(client, run.run_id, status, f"{exc.__class__.__name__}: {exc}")
        raise
    client.set_terminated(run.run_id, "FINISHED")


def _end_quietly(client, run_id: str, status: str, error: str) -> None:
    """Record the failure without masking the original exception if the store itself is the problem."""
    try:
        client.set_tag(run_id, "error", error[:5000])
        client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001 - the job's own error is the one to report
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, exc)

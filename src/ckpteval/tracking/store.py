"""Where runs go: resolve and check the tracking store before any work, and open a client on it.

Every store problem a user can fix (a sqlite path under a file, a file that is not a database, a read-only
place, a server that does not answer) is found here in well under a second and raised as one
``CkptEvalError`` line, before a run is created or a model is loaded.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckpteval.errors import CkptEvalError, TrackingError

log = logging.getLogger("ckpteval.tracking")
SQLITE = "sqlite:///"
SQLITE_MAGIC = b"SQLite format 3\x00"
LOCAL_FIX = "or log locally with tracking.uri=sqlite:///outputs/mlflow.db (or tracking.enabled=false)"


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite path absolute (so every rank, sweep job and `mlflow ui` agree) and create its dir."""
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        uri = SQLITE + str(Path(uri[len(SQLITE):]).resolve())
    if uri.startswith(SQLITE):
        check_sqlite_path(Path(uri[len(SQLITE):]), uri)
    return uri


def check_sqlite_path(db: Path, uri: str) -> None:
    """The db file's dir can be created and written, and the file (when present) is an sqlite database."""
    for parent in [db.parent, *db.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise CkptEvalError(f"tracking.uri={uri}: {parent} is a file, not a directory, so the MLflow "
                                    f"database cannot be created under it: point tracking.uri at a path in a "
                                    f"directory, {LOCAL_FIX}")
            break
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CkptEvalError(f"tracking.uri={uri}: cannot create {db.parent} ({exc.strerror}): point tracking.uri "
                            f"at a writable place, {LOCAL_FIX}") from None
    if db.is_dir():
        raise CkptEvalError(f"tracking.uri={uri}: {db} is a directory, not an sqlite file: name a file, e.g. "
                            f"tracking.uri={SQLITE}{db}/mlflow.db")
    if db.exists():
        with open(db, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
        if head and head != SQLITE_MAGIC:
            raise CkptEvalError(f"tracking.uri={uri}: {db} is not an sqlite database: point tracking.uri at an "
                                f"MLflow sqlite file or a new path, {LOCAL_FIX}")
    target = db if db.exists() else db.parent
    if not _writable(db):
        raise CkptEvalError(f"tracking.uri={uri}: {target} is read-only: point tracking.uri at a writable place, "
                            f"{LOCAL_FIX}")


def _writable(db: Path) -> bool:
    """A real write probe (permission bits say nothing for root or on a read-only mount)."""
    try:
        if db.exists():
            with open(db, "r+b"):
                return True
        probe = db.parent / f".ckpteval_probe_{os.getpid()}"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def ui_command(uri: str) -> str:
    """The command that shows this store in the MLflow UI."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_answers(uri: str, timeout_s: float) -> bool:
    """True when a remote server answers /health (always True for local stores)."""
    if not is_remote(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            resp.read()
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast, before any work, when a remote tracking server does not answer."""
    if not is_remote(uri):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            resp.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CkptEvalError(
            f"tracking server {uri} is unreachable ({reason}): start it (mlflow server --host 0.0.0.0 --port 5000 "
            f"--backend-store-uri sqlite:///mlflow.db), fix tracking.uri, {LOCAL_FIX}"
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


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the ckpteval checkout, when it is one (tags runs with the code that produced them).
    Asked once per process: it is the code this process imported, whatever is committed later, and each job
    of a scan or the watcher would otherwise start a `git` subprocess."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def quiet_mlflow() -> None:
    """MLflow's and alembic's INFO lines (table creation, migrations) tell a user nothing."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # we print the UI command once
    for name in ("alembic", "alembic.runtime.migration", "mlflow", "mlflow.store.db.utils", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_client(uri: str, timeout_s: float = 10.0):
    """An MlflowClient with short HTTP retries (a dead server is reported in seconds, not minutes)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(timeout_s, 1))))
    from mlflow.tracking import MlflowClient

    quiet_mlflow()  # after the import: importing mlflow sets its own loggers' levels
    return MlflowClient(tracking_uri=uri)


EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def _create_experiment(client, tracking_cfg, uri: str) -> str:
    """Create the experiment; another process (a second watcher, a parallel job) may create it first."""
    from mlflow.exceptions import MlflowException

    try:
        # MLflow 3 UIs that choose an experiment's view from its kind open ours on the runs table and curves,
        # not the GenAI (traces) overview. 3.17's global GenAI/Model-training toggle ignores the kind and starts
        # on GenAI; the links a scan prints carry workflowType=machine_learning for that.
        return client.create_experiment(tracking_cfg.experiment, _artifact_location(tracking_cfg, uri),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException as exc:
        exp = client.get_experiment_by_name(tracking_cfg.experiment)
        if exp is None or exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return exp.experiment_id


def open_client(tracking_cfg):
    """Resolve the store, check it answers, and return (client, experiment_id, uri)."""
    uri = resolve_tracking_uri(tracking_cfg.uri)
    check_reachable(uri, tracking_cfg.timeout_s)
    client = make_client(uri, tracking_cfg.timeout_s)
    try:
        exp = client.get_experiment_by_name(tracking_cfg.experiment)
        if exp is not None:
            return client, exp.experiment_id, uri
        return client, _create_experiment(client, tracking_cfg, uri), uri
    except Exception as exc:  # mlflow raises many types for a bad store; one clear line for all of them
        if isinstance(exc, CkptEvalError):
            raise
        log.warning("opening the MLflow store %s failed", uri, exc_info=True)
        raise CkptEvalError(f"cannot open the MLflow store {uri}: {exc.__class__.__name__}: {str(exc)[:300]}; "
                            f"check tracking.uri, {LOCAL_FIX}") from None


def _artifact_location(tracking_cfg, uri: str) -> str | None:
    if tracking_cfg.artifact_location:
        return tracking_cfg.artifact_location
    if uri.startswith(SQLITE):  # keep artifacts beside the db, not in ./mlruns of whatever cwd
        return (Path(uri[len(SQLITE):]).parent / "mlartifacts").resolve().as_uri()
    return None


def tracking_error(uri: str | None, what: str, exc: BaseException) -> TrackingError:
    """A TrackingError for a failed store call. A store that went away is a known fault, not a bug: one WARNING
    line (its traceback at DEBUG)."""
    log.warning("MLflow call failed (%s) on %s: %s: %s", what, uri, type(exc).__name__, str(exc)[:300])
    log.debug("MLflow call failed", exc_info=exc)
    return TrackingError(f"the MLflow store {uri} failed while {what} ({type(exc).__name__}: {str(exc)[:200]})")

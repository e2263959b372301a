"""A series of checkpoint evaluations read back from MLflow (mode=compare, a scan's summary), without any model.

    records = evaluation_records(client, experiment_ids=[...], parent_ids=[...], run_ids=[...])
    # [{"run": "/ckpts/run1", "step": 800, "ckpt": "/ckpts/run1/step_800", "metrics": {...}, "run_id": ...}, ...]

An evaluation run is a FINISHED run tagged `ckpt` and `step` by a `mode=loss|harness` job (a scan's jobs included)
or a watcher evaluation (`mode=watch`, not the watcher's own summary run); training runs, scan parents and
comparisons are not evaluations. Its metrics are each metric's latest value (what the job logged at its step).
Records are ordered oldest first, so when a checkpoint was evaluated twice the newer value wins downstream.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ckpteval.errors import CkptEvalError

log = logging.getLogger("ckpteval.tracking")
EVALUATION_MODES = ("loss", "harness", "watch")


def _search(client, experiment_ids: list[str], filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def is_evaluation(run) -> bool:
    tags = run.data.tags
    return (run.info.status == "FINISHED" and tags.get("mode") in EVALUATION_MODES and bool(tags.get("ckpt"))
            and tags.get("evaluation") != "watcher" and _step(tags.get("step")) is not None)


def _step(text) -> int | None:
    try:
        return int(str(text))
    except (TypeError, ValueError):
        return None


def training_run_of(ckpt: str) -> str:
    """The training run a checkpoint belongs to (naming.run_dir_of), else the dir that holds it."""
    from ckpteval.tracking.naming import run_dir_of

    found = run_dir_of(ckpt)
    if found:
        return found
    scheme, sep, rest = ckpt.rpartition("://")
    return (scheme + sep if sep else "") + str(Path(rest).parent)


def record_of(run) -> dict[str, Any]:
    tags = run.data.tags
    return {"run": training_run_of(tags["ckpt"]), "step": _step(tags["step"]), "ckpt": tags["ckpt"],
            "metrics": dict(run.data.metrics), "run_id": run.info.run_id, "mode": tags.get("mode"),
            "start_time": run.info.start_time or 0}


def evaluation_records(client, *, experiment_ids: list[str] = (), parent_ids: list[str] = (),
                       run_ids: list[str] = ()) -> list[dict[str, Any]]:
    """The finished evaluation runs of the given experiments, scan parents and run ids, oldest first."""
    from mlflow.exceptions import MlflowException

    found: dict[str, Any] = {}
    for exp in experiment_ids:
        for run in _search(client, [exp]):
            found[run.info.run_id] = run
    for parent in parent_ids:
        try:
            exp = client.get_run(parent).info.experiment_id
        except MlflowException:
            raise CkptEvalError(f"compare.parents: no MLflow run {parent} in this store: give a scan's parent run "
                                "id (the `parent run` line a scan prints)") from None
        for run in _search(client, [exp], f"tags.mlflow.parentRunId = '{parent}'"):
            found[run.info.run_id] = run
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise CkptEvalError(f"compare.runs: no MLflow run {run_id} in this store: give evaluation run ids "
                                "(the run id column of the MLflow runs table)") from None
        if not is_evaluation(run):
            raise CkptEvalError(f"compare.runs: run {run_id} is not a finished checkpoint evaluation (it needs the "
                                "tags mode=loss|harness|watch, ckpt and step, and status FINISHED)")
        found[run_id] = run
    records = [record_of(r) for r in found.values() if is_evaluation(r)]
    records.sort(key=lambda r: r["start_time"])
    return records


def experiment_ids(client, names: list[str]) -> list[str]:
    out = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = [e.name for e in client.search_experiments(max_results=20)]
            raise CkptEvalError(f"compare.experiments: no experiment {name!r} in this store (some that exist: "
                                f"{', '.join(known) or 'none'})")
        out.append(exp.experiment_id)
    return out


def child_records(parent_run) -> list[dict[str, Any]]:
    """The evaluation runs nested under a scan's parent run (`ckpteval.tracking.Run`), as records."""
    if not parent_run.active or parent_run.offline is not None:
        return []
    exp = parent_run.client.get_run(parent_run.run_id).info.experiment_id
    runs = _search(parent_run.client, [exp], f"tags.mlflow.parentRunId = '{parent_run.run_id}'")
    return [record_of(r) for r in runs if is_evaluation(r)]


def log_to_runs(client, metrics_by_run: dict[str, tuple[dict[str, float], int]]) -> None:
    """Log metrics to other (finished) runs: {run_id: (metrics, step)}; one batch per run."""
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    for run_id, (metrics, step) in metrics_by_run.items():
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[i:i + 1000])


def tag_runs(client, tags_by_run: dict[str, dict[str, str]]) -> None:
    from mlflow.entities import RunTag

    for run_id, tags in tags_by_run.items():
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def experiment_of(run) -> str:
    """The experiment name of a `ckpteval.tracking.Run`."""
    return run.client.get_experiment(run.client.get_run(run.run_id).info.experiment_id).name


SAMPLE_ARTIFACTS = ("lm_eval", "window_nll.npz")  # harness sample logs; mode=loss's per-window NLL


def download_samples(client, run_id: str, dest: Path) -> str | None:
    """The run's per-sample artifacts (`lm_eval/**/samples_*.jsonl`, `window_nll.npz`) under `dest/<run_id>`, laid
    out as in the job's run dir (what `evaluation.statistics.paired_samples` reads); None when it has none."""
    out = Path(dest) / run_id
    if out.is_dir():
        return str(out)
    try:
        present = {Path(a.path).name for a in client.list_artifacts(run_id)} & set(SAMPLE_ARTIFACTS)
        if not present:
            return None
        out.mkdir(parents=True, exist_ok=True)
        for name in sorted(present):
            client.download_artifacts(run_id, name, str(out))
    except Exception as exc:  # noqa: BLE001 - a missing artifact only costs the p-value
        log.info("no per-sample artifacts for run %s: %s", run_id, exc)
        return None
    return str(out)

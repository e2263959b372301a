"""The best checkpoint in MLflow's model registry: a model version that REFERENCES the checkpoint (its path, step and
eval run), never a copy of the weights, and the alias `best` on the best one so far.

    line = register_best(client, "ckpts-run1.best", ckpt="/ckpts/run1/step_800", step=800, metric="eval/loss",
                         value=2.91, lower=True, k=5, run_id="<eval run>")
    client.get_model_version_by_alias("ckpts-run1.best", "best").tags["ckpt"]    # -> /ckpts/run1/step_800

The version's source is `runs:/<eval run id>` (a tracking server refuses local paths outside a run's artifacts),
and its tags carry `ckpt`, `step`, `metric`, `value` (the last-k-smoothed value that chose it), `k` and
`eval_run_id`. The alias moves only to a strictly better value of the same metric over the same window k (a value
over another window or of another metric replaces it: the criterion changed, e.g. a series that grew past k
checkpoints); registering the checkpoint the alias already points at changes nothing. Stores without
a model registry are reported in the returned line, never raised: a scan or watcher goes on.
"""

from __future__ import annotations

import logging
import math
import re

from ckpteval.errors import CkptEvalError

log = logging.getLogger("ckpteval.tracking")
ALIAS = "best"


def model_name_for(experiment: str | None, configured: str | None = None) -> str:
    """`signal.model_name`, else the experiment's name made a legal model name (`ckpts/run1` -> `ckpts-run1.best`)."""
    if configured:
        check_model_name(configured)
        return configured
    base = re.sub(r"[/:%\\]+", "-", experiment or "ckpteval").strip("-. ") or "ckpteval"
    return f"{base}.best"


def check_model_name(name: str) -> None:
    if not name.strip() or any(c in name for c in "/:%\\"):
        raise CkptEvalError(f"signal.model_name={name!r} is not a registered-model name: MLflow names cannot be "
                            "empty or contain / : % or \\ (e.g. signal.model_name=run1.best)")


def _better(new: float, old: float, lower: bool) -> bool:
    return new < old if lower else new > old


def current_best(client, name: str):
    """The model version the alias points at, or None (no such model, or no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def register_best(client, name: str, *, ckpt: str, step, metric: str, value: float, lower: bool, k: int,
                  run_id: str | None) -> str:
    """Register `ckpt` as a version of model `name` and point the alias `best` at it when it beats the current
    holder (see the module docstring). Returns one line saying what happened."""
    from mlflow.exceptions import MlflowException

    if run_id is None:
        return f"best checkpoint not registered: no MLflow run logged its {metric}"
    if not math.isfinite(value):
        return f"best checkpoint not registered: its {metric} is not a finite number"
    try:
        try:
            client.create_registered_model(name, description="ckpteval: the best checkpoint of a series (alias "
                                           f"'{ALIAS}'); each version references a checkpoint path and its eval run")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        held = current_best(client, name)
        if held is not None:
            tags = held.tags or {}
            same_metric = tags.get("metric") == metric
            if same_metric and tags.get("ckpt") == ckpt:
                return f"alias {name}@{ALIAS} already points at {ckpt} (version {held.version})"
            try:
                old = float(tags.get("value", "nan"))
            except ValueError:
                old = math.nan
            if same_metric and tags.get("k") == str(k) and math.isfinite(old) and not _better(value, old, lower):
                return (f"alias {name}@{ALIAS} stays on version {held.version} ({tags.get('ckpt')}: {metric} "
                        f"{old:.6g}, not beaten by {value:.6g})")
        version = client.create_model_version(
            name, source=f"runs:/{run_id}", run_id=run_id,
            tags={"ckpt": ckpt, "step": str(step), "metric": metric, "value": repr(float(value)), "k": str(k),
                  "direction": "lower" if lower else "higher", "eval_run_id": run_id},
            description=f"checkpoint {ckpt} (step {step}): {metric} = {value:.6g}, mean of its last {k} "
                        "checkpoint(s)")
        client.set_registered_model_alias(name, ALIAS, version.version)
    except MlflowException as exc:
        log.debug("model registry call failed", exc_info=True)
        return (f"best checkpoint not registered: the store has no usable model registry "
                f"({exc.error_code}: {str(exc)[:200]})")
    moved = f"from version {held.version} " if held is not None else ""
    return f"registered {ckpt} as {name} version {version.version}; alias {ALIAS} moved {moved}to it"

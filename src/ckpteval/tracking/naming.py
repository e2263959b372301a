"""What runs and experiments are called in MLflow, so the UI reads well with no setup.

Experiments: one per training run by default. The training run is the dir that holds the checkpoints: the
parent of `checkpoints/` (train_eval's layout) or the dir that holds the `step_N` dirs. The experiment is named
after its last two path components (`train_eval/2026-11-24_05-48-44`, `ckpts/run1`), so the training job, every
`mode=loss|harness` job on its checkpoints, their scans and the watcher on its checkpoint dir land together.
Checkpoints outside any run layout (a single HF dir) go to `ckpteval`; `tracking.experiment=NAME` overrides.

Run names are short enough for the runs table's name column and say what the run is:
`loss@1200`, `harness@1200` (one job), `watch:loss@1200` (the watcher), `scan:loss 05-51-02` (a scan's
parent), `watcher:ckpts` (the watcher's summary run), `train_eval` (training).

No heavy imports here: `--cfg job` resolves the experiment interpolation without torch or mlflow.
"""

from __future__ import annotations

import os
from pathlib import PurePath

from ckpteval.fsutil import has_glob
from ckpteval.steps import is_step_dir_name

DEFAULT_EXPERIMENT = "ckpteval"


def run_dir_of(path: str) -> str | None:
    """The training run a checkpoint (or a checkpoint dir) belongs to; None when the path has no run layout."""
    p = PurePath(path.rstrip("/"))
    if p.name.endswith((".gguf", ".safetensors")):
        p = p.parent
    if is_step_dir_name(p.name):
        p = p.parent
    elif p.name != "checkpoints" and not any(is_step_dir_name(c) for c in _children(str(p))):
        return None  # a lone model dir (HF export): no training run to group by
    if p.name == "checkpoints":
        p = p.parent
    return str(p) if p.name else None


def _children(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _static_prefix(pattern: str) -> str:
    """The dir part of a glob pattern before its first wildcard component (`a/b/step_*` -> `a/b`)."""
    parts = PurePath(pattern).parts
    for i, part in enumerate(parts):
        if has_glob(part):
            return str(PurePath(*parts[:i])) if i else ""
    return pattern


def experiment_name(path: str | None) -> str:
    """Experiment for a checkpoint, or a `glob:` pattern over one run's checkpoints."""
    if not path:
        return DEFAULT_EXPERIMENT
    if path.startswith("glob:"):
        pattern = os.path.expanduser(path[len("glob:"):])
        prefix = _static_prefix(pattern)
        if prefix and "/" not in pattern[len(prefix):].strip("/"):
            path = os.path.join(prefix, "step_0")  # wildcards in the step level only: one run's checkpoints
        else:  # wildcards above it: one experiment only if every match belongs to the same run
            import glob

            runs = {run_dir_of(os.path.abspath(m)) for m in glob.glob(pattern, recursive=True)}
            if len(runs) != 1 or None in runs:
                return DEFAULT_EXPERIMENT
            path = os.path.join(runs.pop(), "checkpoints", "step_0")
    _scheme, sep, rest = path.partition("://")
    run = run_dir_of(rest if sep else os.path.abspath(os.path.expanduser(path)))
    if run is None:
        return DEFAULT_EXPERIMENT
    parts = PurePath(run).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else DEFAULT_EXPERIMENT


def checkpoint_dir_experiment(ckpt_dir: str | None) -> str:
    """Experiment for a dir that receives `step_N` checkpoints (watch.dir, checkpoint.dir), even while empty."""
    return experiment_name(ckpt_dir.rstrip("/") + "/step_0") if ckpt_dir else DEFAULT_EXPERIMENT


def default_experiment(mode: str | None, ckpt: str | None, watch_dir: str | None, checkpoint_dir: str | None,
                       parent_run_id: str | None = None, uri: str | None = None) -> str:
    """The `tracking.experiment` interpolation (conf/tracking/mlflow.yaml): what the job evaluates decides.

    A sweep's jobs follow their parent run's experiment (nested runs must share it, even for a glob over
    several runs)."""
    if parent_run_id and uri:
        found = _parent_experiment(parent_run_id, uri)
        if found:
            return found
    if mode == "watch":
        return checkpoint_dir_experiment(watch_dir)
    if mode == "train_eval":
        return checkpoint_dir_experiment(checkpoint_dir or os.path.join(_job_dir(), "checkpoints"))
    return experiment_name(ckpt)


def _job_dir() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return os.getcwd()


_PARENT_EXPERIMENTS: dict[tuple[str, str], str] = {}  # (run id, uri) -> its experiment (a run never moves)


def _parent_experiment(run_id: str, uri: str) -> str | None:
    """The experiment of the parent run: asked from the store once per process (every access to a scan job's
    `tracking.experiment` resolves the interpolation again, two queries each time), not once per access."""
    found = _PARENT_EXPERIMENTS.get((run_id, uri))
    if found is None:
        found = _ask_parent_experiment(run_id, uri)
        if found is not None:
            _PARENT_EXPERIMENTS[(run_id, uri)] = found
    return found


def _ask_parent_experiment(run_id: str, uri: str) -> str | None:
    try:
        from mlflow.tracking import MlflowClient

        from ckpteval.tracking.store import resolve_tracking_uri

        client = MlflowClient(tracking_uri=resolve_tracking_uri(uri))
        return client.get_experiment(client.get_run(run_id).info.experiment_id).name
    except Exception:  # noqa: BLE001 - an unknown parent: fall back to the derived name (the run says why)
        return None


# ---- run names ------------------------------------------------------------------------------------------


def job_run_name(mode: str, ckpt: str | None, step: int | None) -> str:
    """`loss@1200`; without a step, the checkpoint's name (`harness:llama-1b`)."""
    if step is not None:
        return f"{mode}@{step}"
    return f"{mode}:{PurePath(ckpt).name}" if ckpt else mode


def watch_run_name(evaluation: str, ckpt: str | None, step: int | None) -> str:
    """A watcher's evaluation: `watch:loss@1200`, distinguishable from a `loss@1200` job at a glance."""
    return "watch:" + job_run_name(evaluation, ckpt, step)


def watcher_run_name(watch_dir: str) -> str:
    """`watcher:run1`: the run dir's name (not `checkpoints`), its tail when long (a timestamp)."""
    p = PurePath(str(watch_dir).rstrip("/"))
    name = p.parent.name if p.name == "checkpoints" and p.parent.name else p.name
    return f"watcher:{name[-12:]}"


def scan_run_name(mode: str | None, sweep_dir: str) -> str:
    return f"scan:{mode or 'jobs'} {PurePath(sweep_dir).name[-8:]}"


# ---- the experiment page every mode points people to -------------------------------------------------------
#
# MLflow 3.17's UI picks GenAI or Model-training from the URL parameter `workflowType`, else from the browser's
# localStorage (`mlflow.workflowType_v1`, written only by the sidebar's GenAI / Model training toggle), default
# GenAI: a bare experiment URL opens the empty GenAI overview, and no server option or experiment tag changes that
# (the `mlflow.experimentKind` tag is ignored). So every link we print carries `workflowType=machine_learning`.

VIEW_KEY = "ckpteval"  # MLflow's saved view: experiment tag mlflow.sharedViewState.<key>, URL ?viewStateShareKey=<key>
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_NAME = "ckpteval: key metrics"  # how the view is listed under the runs page's "Views" button
MAX_VIEW_COLUMNS = 12


def publish_view(run, metrics: list[str]) -> None:
    """Save (or extend) the experiment's "ckpteval: key metrics" view: `metrics` as runs-table columns (after the
    ones it already shows), every run drawn in the charts (MLflow hides all but 10 by default). The link
    `view_links` prints opens it; the runs page lists it under "Views"."""
    import json
    import time

    experiment_id = run.client.get_run(run.run_id).info.experiment_id
    old = run.client.get_experiment(experiment_id).tags.get(VIEW_TAG)
    state, created = _view_state(old)
    columns = [f"metrics.`{m}`" for m in metrics]
    columns += [c for c in state.get("selectedColumns", []) if c not in columns]
    state.update(selectedColumns=columns[:MAX_VIEW_COLUMNS], runsHiddenMode="SHOW_ALL", viewMaximized=False,
                 runListHidden=False)
    now = int(time.time() * 1000)
    envelope = {"name": VIEW_NAME, "createdAt": created or now, "updatedAt": now, "state": json.dumps(state)}
    run.client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(envelope))


def _view_state(tag_value: str | None) -> tuple[dict, int | None]:
    """(state, createdAt) of a stored view: MLflow's saved-view envelope, or the bare state older ckpteval wrote."""
    import json

    try:
        stored = json.loads(tag_value) if tag_value else {}
    except ValueError:
        return {}, None
    if isinstance(stored.get("state"), str):
        try:
            return json.loads(stored["state"]), stored.get("createdAt")
        except ValueError:
            return {}, stored.get("createdAt")
    return stored, None


def view_links(run) -> tuple[str, str]:
    """(runs table, curves) links for the experiment of `run`; a local store is shown by `mlflow ui` on :5000.
    They name the saved view only when the experiment has it (MLflow sends a link to a missing view back to the
    bare experiment URL, i.e. the GenAI overview)."""
    experiment_id = run.client.get_run(run.run_id).info.experiment_id
    has_view = VIEW_TAG in run.client.get_experiment(experiment_id).tags
    return view_urls(ui_base(run.uri), experiment_id, shared_view=has_view)


def ui_base(uri: str) -> str:
    """Where the UI of a store answers: the server itself, or `mlflow ui`'s default address for a local store."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def view_urls(ui_base: str, experiment_id: str, shared_view: bool = True) -> tuple[str, str]:
    """(runs table with the key metrics, chart view) of an experiment. `workflowType=machine_learning`: MLflow
    3 otherwise opens every experiment on its GenAI overview (traces), which ckpteval does not log."""
    base = f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    share = f"&viewStateShareKey={VIEW_KEY}" if shared_view else ""
    return f"{base}&compareRunsMode=TABLE{share}", f"{base}&compareRunsMode=CHART{share}"

"""What `mode=ui` needs from MLflow: the server command for a store, and the link to open once it answers."""

from __future__ import annotations

import sys
from pathlib import Path

from ckpteval.tracking.store import SQLITE


def server_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow server` on the store: one worker (a laptop or a 2-core box), artifacts served from beside an sqlite
    store (where ckpteval's experiments keep them: tracking/store.py)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]
    if uri.startswith(SQLITE):
        cmd += ["--artifacts-destination", (Path(uri[len(SQLITE):]).parent / "mlartifacts").resolve().as_uri()]
    return cmd


def newest_view_link(uri: str, base: str, timeout_s: float = 10.0) -> tuple[str | None, str]:
    """(experiment name, link): the curves of the experiment with the newest run (the store's home page when it
    holds no run yet)."""
    from ckpteval.tracking.naming import VIEW_TAG, view_urls
    from ckpteval.tracking.store import make_client

    client = make_client(uri, timeout_s)
    ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    runs = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not runs:
        return None, base.rstrip("/") + "/#/experiments?workflowType=machine_learning"
    exp = client.get_experiment(runs[0].info.experiment_id)
    return exp.name, view_urls(base, exp.experiment_id, shared_view=VIEW_TAG in exp.tags)[1]

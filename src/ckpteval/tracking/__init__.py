"""Everything that talks to MLflow lives in this package (nothing else imports mlflow):

- ``store``: resolve and check the tracking store, open a client;
- ``run``: one run's lifecycle (``mlflow_run``, ``Run``), offline to the outbox when the store fails, and
  ``print_view``: the `View:` link every mode prints;
- ``naming``: experiment and run names, the UI links (Model-training charts) and the saved key-metrics view;
- ``outbox``: what a run still owes a store that went away, and its replay (``replay_outbox``);
- ``view``: the watcher's queries (which pairs are FINISHED, orphaned runs).

Importing this package imports no mlflow: that happens on first use.
"""

from ckpteval.tracking.outbox import Outbox, outbox_dir, replay_outbox
from ckpteval.tracking.run import Run, mlflow_run, open_run, print_view
from ckpteval.tracking.store import (
                                     check_reachable,
                                     flatten,
                                     git_commit,
                                     open_client,
                                     resolve_tracking_uri,
                                     ui_command,
)

__all__ = ["Outbox", "Run", "check_reachable", "flatten", "git_commit", "mlflow_run", "open_client", "open_run",
           "outbox_dir", "print_view", "replay_outbox", "resolve_tracking_uri", "ui_command"]

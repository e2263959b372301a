"""The exception types for problems the user can fix. ``ckpteval.job`` maps each to its one ``error: ...`` line
and exit code (2; 3 for ``TrackingOutbox``); anything else is a bug and keeps its traceback."""


class CkptEvalError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class TrackingError(CkptEvalError):
    """The tracking store (MLflow) failed or went away while a job ran: the evaluation itself may be fine, so
    callers keep its results (outbox) and never count it as a failed attempt of the checkpoint."""


class TrackingOutbox(TrackingError):
    """The evaluation finished and its run was ended FINISHED, but into the outbox: the store went away, so the
    results wait there until a replay delivers them (exit code 3)."""

    def __init__(self, message: str, run_id: str | None = None):
        super().__init__(message)
        self.run_id = run_id

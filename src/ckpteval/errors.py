"""The one exception type for problems the user can fix. ``app.main`` prints its message as one line
(``error: ...``) and exits non-zero; anything else is a bug and keeps its traceback."""


class CkptEvalError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class TrackingError(CkptEvalError):
    """The tracking store (MLflow) failed or went away while a job ran: the evaluation itself may be fine, so
    callers keep its results (outbox) and never count it as a failed attempt of the checkpoint."""

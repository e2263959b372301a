"""The job runner's contracts, in-process: one mapping from an outcome to its line and exit code, one stop-signal
context for jobs (raise at once) and the watcher (stop between evaluations, abort inside one)."""

from __future__ import annotations

import signal
import threading

import pytest

from ckpteval.errors import CkptEvalError, TrackingError, TrackingOutbox
from ckpteval.job import (
    EXIT_TRACKING_OUTBOX,
    EXIT_USER_ERROR,
    JobStopped,
    Stop,
    exit_code,
    exit_with,
    in_multirun,
    outcome_line,
    stop_signals,
)
from tests import factories


@pytest.mark.parametrize("exc, code, line", [
    (CkptEvalError("eval.steps=0 is out of range"), EXIT_USER_ERROR, "error: eval.steps=0 is out of range"),
    (TrackingError("the MLflow store went away"), EXIT_USER_ERROR, "error: the MLflow store went away"),
    (TrackingOutbox("results are kept in the outbox", run_id="r1"), EXIT_TRACKING_OUTBOX, "error: results are kept"),
    (JobStopped("SIGTERM"), 128 + 15, "stopped by SIGTERM: its MLflow run(s) ended KILLED"),
    (JobStopped("SIGINT"), 128 + 2, "stopped by SIGINT"),
    (JobStopped("SIGHUP"), 128 + 1, "stopped by SIGHUP"),
])
def test_one_mapping_from_outcome_to_line_and_exit_code(exc, code, line, capsys):
    assert exit_code(exc) == code and outcome_line(exc).startswith(line)
    with pytest.raises(SystemExit) as done:
        exit_with(exc)
    assert done.value.code == code
    assert capsys.readouterr().err.splitlines() == [outcome_line(exc)]


def test_outbox_is_a_type_not_a_word():
    """Exit 3 is chosen by the error's type: a user error that mentions the outbox is still a user error."""
    assert exit_code(CkptEvalError("cannot write the tracking outbox /x: set tracking.outbox=DIR")) == 2
    assert TrackingOutbox("kept", run_id="abc").run_id == "abc"


def test_a_job_stops_at_once_and_a_second_signal_is_ignored():
    with pytest.raises(JobStopped, match="SIGTERM"), stop_signals() as stop:
        try:
            signal.raise_signal(signal.SIGTERM)
        finally:
            signal.raise_signal(signal.SIGINT)  # while the first unwinds: ignored, the job is already stopping
    assert stop.stopped and stop.reason == "SIGTERM"


def test_the_watcher_stops_between_evaluations_and_aborts_one_under_way():
    wake = threading.Event()
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals(Stop(raising=False, wake=[wake], doing="the watcher")) as stop:
        with pytest.raises(JobStopped, match="SIGHUP"), stop.interruptible():  # inside an evaluation: aborted
            signal.raise_signal(signal.SIGHUP)
        assert stop.stopped and wake.is_set() and not stop.raising
        signal.raise_signal(signal.SIGTERM)  # between evaluations: noted, nothing raised
        assert stop.reason == "SIGHUP"  # the first signal is the reason
        with pytest.raises(JobStopped), stop.interruptible():  # no new evaluation starts once stopped
            raise AssertionError("an evaluation started after the stop")
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are given back


def test_nested_blocks_give_the_outer_handlers_back():
    with stop_signals() as outer:
        with stop_signals(Stop(raising=False)) as inner:
            signal.raise_signal(signal.SIGTERM)
        assert inner.stopped and not outer.stopped
        with pytest.raises(JobStopped):
            signal.raise_signal(signal.SIGTERM)
    assert outer.stopped


def test_in_multirun_reads_the_composed_hydra_mode():
    from hydra import compose, initialize_config_dir

    from ckpteval.config import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(factories.REPO / "conf")):
        scan = compose(config_name="config", overrides=["sweep=scan_loss"], return_hydra_config=True)
        single = compose(config_name="config", overrides=["mode=loss"], return_hydra_config=True)
    assert in_multirun(scan) and not in_multirun(single)
    assert not in_multirun()  # no Hydra job running here

"""`mode=ui`: starts `mlflow server` on the configured store, says so, waits until it answers, prints the View link,
stops cleanly on Ctrl-C (SIGINT). The server it starts is a real one: the model registry's `best` alias is checked
against it too (the same checks as on sqlite, tests/test_signal.py).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from ckpteval import app
from tests import factories
from tests.test_signal import check_alias_moves_only_to_a_better_checkpoint


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`python run.py mode=ui` on an sqlite store holding one finished run, read line by line."""
    from ckpteval.tracking.store import make_client

    tmp = tmp_path_factory.mktemp("ui")
    client = make_client(f"sqlite:///{tmp}/mlflow.db")
    exp = client.create_experiment("ckpts/run1", artifact_location=(tmp / "mlartifacts").as_uri())
    client.set_terminated(client.create_run(exp).info.run_id)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(factories.REPO / "run.py"), "mode=ui", f"ui.port={port}",
                             f"tracking.uri=sqlite:///{tmp}/mlflow.db"], cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 300
    while not any(line.startswith("View: ") for line in seen):
        assert proc.poll() is None, "\n".join(seen)
        try:
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError("mode=ui printed no View link within 300 s:\n" + "\n".join(seen)) from None
    yield {"proc": proc, "lines": lines, "seen": seen, "base": f"http://127.0.0.1:{port}", "experiment": exp}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_ui_says_it_is_starting_waits_and_prints_the_view_link(ui):
    seen, base = ui["seen"], ui["base"]
    starting = next(i for i, line in enumerate(seen) if line.startswith("MLflow UI: starting on "))
    up = next(i for i, line in enumerate(seen) if line.startswith("MLflow UI: up after"))
    view = next(line for line in seen if line.startswith("View: "))
    assert starting < up < seen.index(view)
    assert base in seen[starting]
    assert view.startswith(f"View: {base}/#/experiments/{ui['experiment']}/runs?workflowType=machine_learning")
    assert "(experiment ckpts/run1" in view
    assert _health(base)  # it answers


def test_registry_alias_moves_on_a_real_mlflow_server(ui):
    from ckpteval.tracking.store import make_client

    client = make_client(ui["base"])
    exp = client.create_experiment("server-registry")
    runs = {}
    for ckpt in ("/c/step_100", "/c/step_200", "/c/step_300"):
        run = client.create_run(exp, tags={"ckpt": ckpt})
        client.set_terminated(run.info.run_id)
        runs[ckpt] = run.info.run_id
    check_alias_moves_only_to_a_better_checkpoint(client, runs, "server-registry.best")


def test_ui_stops_cleanly_on_ctrl_c(ui):
    proc = ui["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    rest = []
    while not ui["lines"].empty():
        rest.append(ui["lines"].get())
    assert "MLflow UI: stopped" in rest and not [line for line in rest if "Traceback" in line]
    assert not _health(ui["base"])  # the server (and its worker) are gone


def test_ui_on_a_taken_port_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            app.main(factories.compose(["mode=ui", f"ui.port={port}", f"tracking.uri=sqlite:///{tmp_path}/m.db"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"error: ui.port={port} on 127.0.0.1 is taken (Address already in use): another MLflow UI may "
                    f"be running there (open http://127.0.0.1:{port}), or pick a free port with ui.port=N")]

"""`mode=ui`: the MLflow UI on the configured store, started, waited for, linked; Ctrl-C stops it.

    python run.py mode=ui                                    # sqlite:///outputs/mlflow.db on http://127.0.0.1:5000
    python run.py mode=ui tracking.uri=sqlite:///runs/mlflow.db ui.port=5001
    python run.py mode=ui ui.host=0.0.0.0                    # reachable from other machines (mind who can reach it)

`mlflow server` prints nothing while it imports and migrates the store (tens of seconds on a busy machine), so
this says it is starting, polls its /health until it answers (`ui.timeout_s`), then prints the View link: the
curves of the experiment with the newest run. A store that is already a server (`tracking.uri=http://...`)
needs no UI process: its link is printed at once.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from ckpteval.errors import CkptEvalError
from ckpteval.tracking.store import is_remote, resolve_tracking_uri
from ckpteval.tracking.ui import newest_view_link, server_command

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run(cfg, job) -> dict[str, Any]:
    if not job.dist.is_main:
        return {}
    uri = resolve_tracking_uri(cfg.tracking.uri)
    if is_remote(uri):
        _, link = newest_view_link(uri, uri, cfg.tracking.timeout_s)
        print(f"MLflow UI: the store is a server already: {uri}", flush=True)
        print(f"View: {link}", flush=True)
        return {}
    host, port = str(cfg.ui.host), int(cfg.ui.port)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
    _check_port_free(host, port)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    print(f"MLflow UI: starting on {base} for {uri} (it prints nothing until it answers; up to a minute on a busy "
          f"machine) ...", flush=True)
    proc = subprocess.Popen(server_command(uri, host, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail: collections.deque[str] = collections.deque(maxlen=20)
    threading.Thread(target=lambda: tail.extend(line.rstrip() for line in proc.stderr), daemon=True).start()
    try:
        started = time.monotonic()
        if not _wait_until_up(proc, base, stop, float(cfg.ui.timeout_s), tail):
            return {}
        name, link = newest_view_link(uri, base, cfg.tracking.timeout_s)
        print(f"MLflow UI: up after {time.monotonic() - started:.0f}s; Ctrl-C stops it", flush=True)
        print(f"View: {link}" + (f"   (experiment {name}, the newest run's)" if name else ""), flush=True)
        while not stop.wait(0.5):
            if proc.poll() is not None:
                raise CkptEvalError(f"the MLflow UI exited on its own (exit {proc.returncode}): "
                                    f"{' | '.join(list(tail)[-4:])[:600]}")
    finally:
        _stop(proc)
        for sig, old in previous.items():
            signal.signal(sig, old)
    print("MLflow UI: stopped", flush=True)
    return {}


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise CkptEvalError(f"ui.port={port} on {host} is taken ({exc.strerror}): another MLflow UI may be running "
                                f"there (open http://{host}:{port}), or pick a free port with ui.port=N") from None


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_until_up(proc, base: str, stop: threading.Event, timeout_s: float, tail) -> bool:
    """True once /health answers; False when stopped first; CkptEvalError when it dies or takes too long."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        if _answers(base):
            return True
        if proc.poll() is not None:
            raise CkptEvalError(f"the MLflow UI exited before answering (exit {proc.returncode}): "
                                f"{' | '.join(list(tail)[-4:])[:600]}")
        if time.monotonic() > deadline:
            raise CkptEvalError(f"the MLflow UI did not answer on {base} within ui.timeout_s={timeout_s:g}s: raise "
                                f"ui.timeout_s on a busy machine")
        stop.wait(0.5)
    return False


def _stop(proc, grace_s: float = 15.0) -> None:
    """SIGTERM to the server's process group (mlflow server runs uvicorn in a child), SIGKILL after a grace period."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass

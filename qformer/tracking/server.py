"""A private `mlflow server` over the sweep's sqlite store, for as long as the sweep runs.

Why a server rather than logging from the Tune driver only: each trial trains through the same code
path as `qformer train`, whose rank-0 worker logs params, metrics and checkpoints to its own MLflow run.
Several trials doing that straight into one sqlite file race on its lock and on first-use schema
migration; one server process serialises the writes and the trials keep their full per-run logging.
Artifacts are not proxied (--no-serve-artifacts): clients write them to the store's artifact root
directly, which is where the embedded store puts them too, so the runs read the same after the
server is gone.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qformer.core.logs import get_logger

log = get_logger(__name__)


def is_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:")


@contextmanager
def local_tracking_server(backend_uri: str, artifact_root: Path, log_path: Path,
                          start_timeout_s: float = 300.0, port: int | None = None) -> Iterator[str]:
    """Serve `backend_uri` on 127.0.0.1 (`port`, else a free one); yield its http:// URI; stop it (by its PID)
    after. Also the `qformer ui` server: MLflow's UI is the same process."""
    artifact_root.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    if not port_free(port):
        raise RuntimeError(f"port {port} on 127.0.0.1 is in use (another MLflow UI?); choose another with --port")
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli) if mlflow_cli.exists() else "mlflow", "server",
           "--backend-store-uri", backend_uri, "--default-artifact-root", str(artifact_root),
           "--no-serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # The server's background job runner (a tree of huey consumers) is not needed for tracking.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "ab") as out:
        # Own session: the server and its uvicorn child form one process group we can stop together.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, proc, start_timeout_s, log_path)
        log.info("MLflow server for the sweep: %s (pid %d, store %s, log %s)", uri, proc.pid, backend_uri, log_path)
        yield uri
    finally:
        _stop(proc)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(uri: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"mlflow server at {uri} not healthy after {timeout_s:.0f}s; see {log_path}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (its pgid is its PID), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass

"""The compose `mlflow` service's command line, run for real (SQLite instead of PostgreSQL, a temp dir
instead of the artifacts volume): its health check passes, MLflow's Host-header check accepts the
compose service name and rejects others, and artifacts travel through the server (--serve-artifacts),
so a Ray worker needs only the tracking URI.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def compose_mlflow_service() -> dict:
    """The `mlflow` service with the compose file's defaults filled in (what `${VAR:-default}` gives)."""
    service = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["mlflow"]
    service["command"] = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), service["command"])
    return service


def server_args(command: str, port: int, store: Path, artifacts: Path) -> list[str]:
    """The compose command with only the storage and the listening address swapped."""
    args = shlex.split(command)
    assert args[:2] == ["mlflow", "server"], args
    swap = {"--backend-store-uri": f"sqlite:///{store}", "--artifacts-destination": str(artifacts),
            "--host": "127.0.0.1", "--port": str(port), "--workers": "1"}
    out = [str(VENV_BIN / "mlflow"), "server"]
    rest = args[2:]
    i = 0
    while i < len(rest):
        flag = rest[i]
        if flag in swap:
            out += [flag, swap[flag]]
            i += 2
        else:
            out.append(flag)
            i += 1
    return out


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    service = compose_mlflow_service()
    cmd = server_args(service["command"], port, tmp / "mlflow.db", tmp / "artifacts")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = open(tmp / "server.log", "w")
    # Own process group: the server's workers are stopped with it, and nothing else is touched.
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
        yield {"url": url, "port": port, "artifacts": tmp / "artifacts", "service": service, "tmp": tmp}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_compose_health_check_passes(mlflow_server):
    test = mlflow_server["service"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3].replace("127.0.0.1:5000", f"127.0.0.1:{mlflow_server['port']}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def status_with_host(url: str, host: str) -> int:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.parametrize("host", ["mlflow:5000", "localhost:5000", "127.0.0.1:5000"])
def test_server_accepts_the_compose_and_loopback_host_names(mlflow_server, host):
    assert status_with_host(mlflow_server["url"], host) == 200


def test_server_rejects_other_host_headers(mlflow_server):
    assert status_with_host(mlflow_server["url"], "attacker.example:5000") in (400, 403)


def test_artifacts_go_through_the_server(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server["url"])
    exp_id = client.create_experiment("platform-artifacts")
    run = client.create_run(exp_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri  # proxied, not a path
    ckpt = tmp_path / "checkpoint.pth"
    ckpt.write_bytes(os.urandom(4096))
    client.log_artifact(run.info.run_id, str(ckpt), "checkpoints/final")
    client.set_terminated(run.info.run_id)

    stored = list(mlflow_server["artifacts"].rglob("checkpoint.pth"))
    assert len(stored) == 1 and stored[0].read_bytes() == ckpt.read_bytes(), "server wrote it to its destination"
    fetched = Path(client.download_artifacts(run.info.run_id, "checkpoints/final/checkpoint.pth", str(tmp_path / "dl")))
    assert fetched.read_bytes() == ckpt.read_bytes()

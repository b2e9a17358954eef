"""The MLflow tracking server killed mid-run and restarted; a run started while it is down."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from chaos_helpers import ChaosRow, chaos_cfg, client_for, latest_run_id, loss_steps, wait_for
from helpers import free_port

from qformer.config import ConfigError

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.slow]


class TrackingServer:
    """`mlflow server` on a loopback port over a sqlite file; killed and restarted on the same port."""

    def __init__(self, tmp_path: Path):
        self.port = free_port()
        self.db, self.artifacts, self.log = tmp_path / "server.db", tmp_path / "artifacts", tmp_path / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{self.db}",
               "--default-artifact-root", str(self.artifacts), "--no-serve-artifacts", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False
        wait_for(healthy, 120, f"mlflow server on {self.uri}", every_s=0.5)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its uvicorn worker
        self.proc.wait(30)


@pytest.fixture
def server(tmp_path):
    srv = TrackingServer(tmp_path)
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.kill()


def test_a_run_started_while_the_server_is_down_fails_fast(tiny_bert, shapes, tmp_path, server):
    from qformer.jobs.train_job import launch_training

    cfg = chaos_cfg(tiny_bert, shapes, tmp_path, "down", {"mlflow": {"tracking_uri": server.uri}})
    with pytest.raises(ConfigError) as info:
        launch_training(cfg, local_mode=True)
    message = str(info.value)
    assert info.value.key == "run.mlflow.tracking_uri" and "\n" not in message
    assert f"MLflow tracking server {server.uri} is not reachable" in message and "run.mlflow.enabled=false" in message
    # before Ray and before MLflow's minutes of retries: no Train run was set up
    assert not (tmp_path / "down" / "ray_results").exists()


def test_server_killed_mid_run_costs_no_metric(ray_cluster, tiny_bert, shapes, tmp_path, server, chaos_report):
    from qformer.jobs.train_job import launch_training

    server.start()
    cfg = chaos_cfg(tiny_bert, shapes, tmp_path, "outage", {"max_steps_per_epoch": 8, "save_freq_steps": 1,
                                                 "mlflow": {"tracking_uri": server.uri}})
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=launch_training(cfg, local_mode=True)), daemon=True)
    thread.start()
    run_id = wait_for(lambda: latest_run_id(server.uri), 300, "the MLflow run")
    wait_for(lambda: max(loss_steps(server.uri, run_id), default=0) >= 2, 300, "step 2 in MLflow")
    killed_after = max(loss_steps(server.uri, run_id))
    server.kill()
    down_at = time.monotonic()
    local = tmp_path / "outage" / "ray_results"

    def trained_to() -> int:
        steps = [json.loads(m.read_text())["step"] for m in local.glob("*/local_checkpoints/*/meta.json")]
        return max(steps, default=0)
    # training goes on while the server is down: more steps checkpointed (one per step); the run's end
    # keeps trying the server for run.mlflow.outage_wait_s, so a server back within that loses nothing
    wait_for(lambda: trained_to() >= killed_after + 2, 300, "steps trained during the outage")
    down_s = time.monotonic() - down_at
    server.start()
    up_at = time.monotonic()
    wait_for(lambda: max(loss_steps(server.uri, run_id)) > killed_after, 300, "the buffered steps in MLflow")
    recover_s = time.monotonic() - up_at
    thread.join(600)
    result = outcome["result"]
    assert result.error is None and result.metrics["step"] == 8
    run = client_for(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert loss_steps(server.uri, run_id) == list(range(1, 9))  # buffered while down, sent after, original steps
    late = int(run.data.tags.get("qformer.metrics_sent_late", 0))
    assert late > 0 and int(run.data.tags.get("qformer.metrics_lost", 0)) == 0
    chaos_report(ChaosRow(f"MLflow server killed mid-run for {down_s:.0f} s, restarted", f"training goes on; "
                          f"metrics buffered ({late} values sent late), none lost; run FINISHED", 0, 0, 1, recover_s))

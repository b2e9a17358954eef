"""`qformer ui`: a real MLflow UI server over a sqlite store, the latest run's page printed, stopped by Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from browser import running_ui
from qformer.tracking.run_tracker import RunTracker
from qformer.tracking.uri import EXPERIMENT_KIND, ensure_experiment, mlflow_client


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read()


def test_ui_serves_the_store_prints_the_latest_run_and_stops_on_ctrl_c(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    RunTracker.start(uri, "older", run_name="first").end()
    latest = RunTracker.start(uri, "demo-like", run_name="second")
    latest.log_metrics({"loss": 1.5}, step=1)
    latest.end()
    with running_ui(uri, tmp_path / "home") as (proc, port, lines):
        page = next(line for line in lines if line.startswith("latest run:")).split()[-1]
        experiment_id = latest.experiment_id
        assert page == f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{latest.run_id}?workflowType=machine_learning"
        status, html = _get(f"http://127.0.0.1:{port}/")
        assert status == 200 and b"<html" in html.lower()  # the UI itself, not only the API
        _, body = _get(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/get?run_id={latest.run_id}")
        assert json.loads(body)["run"]["data"]["metrics"][0]["key"] == "loss"
        _, body = _get(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get?experiment_id={experiment_id}")
        tags = {t["key"]: t["value"] for t in json.loads(body)["experiment"]["tags"]}
        assert tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]  # MLflow's model-training view
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "MLflow UI stopped." in proc.stdout.read()
        with socket.socket() as sock:  # the server went with it
            assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_ui_names_a_busy_port(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "QFORMER_HOME": str(tmp_path)}
        proc = subprocess.run([sys.executable, "-m", "qformer.cli", "ui", "--tracking-uri",
                               f"sqlite:///{tmp_path}/m.db", "--port", str(port)],
                              capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in proc.stdout


def test_experiments_made_before_the_tag_get_it(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    bare = mlflow_client(uri).create_experiment("made-elsewhere")
    assert ensure_experiment(uri, "made-elsewhere") == bare
    assert mlflow_client(uri).get_experiment(bare).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]


def test_runs_name_their_source_command_entry_point_and_commit(tmp_path: Path, monkeypatch):
    """MLflow's run page shows the Source (it was "-"): the command line, its sub-command and the commit."""
    monkeypatch.setattr(sys, "argv", ["/venv/bin/qformer", "train", "--cfg-path", "experiments/x.yaml"])
    monkeypatch.setenv("QFORMER_GIT_COMMIT", "abc123")
    run = RunTracker.start(f"sqlite:///{tmp_path}/mlflow.db", "sources", run_name="r")
    tags = run.client.get_run(run.run_id).data.tags
    assert tags["mlflow.source.name"] == "qformer train --cfg-path experiments/x.yaml"
    assert (tags["mlflow.project.entryPoint"], tags["mlflow.source.git.commit"]) == ("train", "abc123")

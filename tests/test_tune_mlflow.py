"""The sweep's MLflow plumbing on a real sqlite store behind a real `mlflow server` subprocess."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from qformer.tracking import sweep_runs as mlflow_runs
from qformer.tracking.server import local_tracking_server
from qformer.jobs.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_server_parent_children_and_orphans(tmp_path):
    spec = load_sweep(REPO / "experiments" / "sweeps" / "tiny_lr_queries.yaml")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = tmp_path / "artifacts"
    with local_tracking_server(store, artifacts, tmp_path / "server.log") as uri:
        assert uri.startswith("http://127.0.0.1:")
        client = MlflowClient(tracking_uri=uri)
        exp_id = client.create_experiment("sweeps", artifact_location=(artifacts / "sweeps").as_uri())
        parent = mlflow_runs.start_parent(client, exp_id, spec.name, spec.mlflow_params(), spec.input_files(), tmp_path)
        # Children as the training code opens them: tagged with the parent's id.
        done = client.create_run(exp_id, run_name="t0", tags={mlflow_runs.PARENT_TAG: parent}).info.run_id
        client.set_terminated(done, "FINISHED")
        left = client.create_run(exp_id, run_name="t1", tags={mlflow_runs.PARENT_TAG: parent}).info.run_id
        cut = client.create_run(exp_id, run_name="t2", tags={mlflow_runs.PARENT_TAG: parent}).info.run_id
        client.set_terminated(cut, "FAILED")  # an early-stopped trial whose error handler ran before the kill
        client.create_run(exp_id, run_name="unrelated")
        children = mlflow_runs.child_runs(client, exp_id, parent)
        assert sorted(r.info.run_name for r in children) == ["t0", "t1", "t2"]
        assert mlflow_runs.close_orphans(client, children) == [left]  # FAILED stays FAILED unless stopped
        children = mlflow_runs.child_runs(client, exp_id, parent)
        assert mlflow_runs.close_orphans(client, children, frozenset({cut, done})) == [cut]
        assert client.get_run(cut).info.status == "KILLED" and client.get_run(done).info.status == "FINISHED"
        report = tmp_path / "results.csv"
        report.write_text("trial\n")
        mlflow_runs.finish_parent(client, parent, [report], {"best_val/r_mean": 1.5}, {"best_trial": "t0"})
        server_pid_log = (tmp_path / "server.log").read_text()
    # After the server stopped, the sqlite store itself holds everything, artifacts included.
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(left).info.status == "KILLED"
    assert client.get_run(done).info.status == "FINISHED"
    p = client.get_run(parent)
    assert p.info.status == "FINISHED" and p.data.metrics["best_val/r_mean"] == 1.5
    assert p.data.params["search_space.run.init_lr"].startswith("loguniform")
    assert p.data.params["metric"] == spec.metric and p.data.tags["best_trial"] == "t0"
    local = client.download_artifacts(parent, "sweep/results.csv", str(tmp_path / "dl"))
    assert Path(local).read_text() == "trial\n"
    assert str(artifacts) in p.info.artifact_uri
    assert server_pid_log  # the server wrote its log where we said


def test_server_that_cannot_start_is_reported(tmp_path):
    garbage = tmp_path / "not_a_db.db"
    garbage.write_bytes(b"this is not an sqlite file" * 100)
    bad_store = f"sqlite:///{garbage}"
    with pytest.raises(RuntimeError, match="mlflow server"):
        with local_tracking_server(bad_store, tmp_path / "a", tmp_path / "server.log", start_timeout_s=60):
            pass
    assert os.path.exists(tmp_path / "server.log")

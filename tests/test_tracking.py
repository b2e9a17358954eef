"""MLflow helpers on a real sqlite store in tmp_path."""
from __future__ import annotations

from pathlib import Path

import pytest

from qformer.core import paths
from qformer.core import signals
from qformer.tracking.params import flatten_params
from qformer.tracking.run_tracker import TRAIN_KEY_TAG, RunTracker, end_status
from qformer.tracking.uri import resolve_tracking_uri, ui_hint


def test_flatten_params_respects_limits():
    tree = {"run": {"init_lr": 1e-4, "ray": {"num_workers": 2, "resources_per_worker": None}, "train_splits": ["train"]},
            "model": {"vit_kwargs": {}, "long": "x" * 7000}, "k" * 300: 1}
    flat = flatten_params(tree)
    assert flat["run.init_lr"] == "0.0001" and flat["run.ray.num_workers"] == "2"
    assert flat["run.ray.resources_per_worker"] == "null" and flat["run.train_splits"] == "['train']"
    assert flat["model.vit_kwargs"] == "{}"
    assert len(flat["model.long"]) == 6000
    assert not any(len(k) > 250 for k in flat)


def test_default_uri_is_under_qformer_home(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(None)
    assert uri == paths.default_tracking_uri() and str(paths.qformer_home()) in uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(None) == "http://mlflow:5000"
    assert resolve_tracking_uri("sqlite:////tmp/x/y.db") == "sqlite:////tmp/x/y.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    hint = ui_hint(paths.default_tracking_uri(), "1", "abc")  # the default store: `qformer ui` needs no flag
    assert hint.split()[0].endswith("qformer") and hint.split()[1:3] == ["ui", "then"]
    assert hint.endswith("http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning")
    assert " ui --tracking-uri sqlite:////tmp/x/y.db " in ui_hint("sqlite:////tmp/x/y.db")


def test_run_lifecycle_params_metrics_artifacts_reopen(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = RunTracker.start(uri, "exp-a", run_name="sweep")
    tracker = RunTracker.start(uri, "exp-a", run_name="r1", tags={"model_type": "tiny", TRAIN_KEY_TAG: "/s/name"},
                               params={"run.init_lr": "0.0001"}, config_yaml="run:\n  init_lr: 1e-4\n",
                               parent_run_id=parent.run_id)
    for step in (5, 10):
        tracker.log_metrics({"loss": 10.0 / step, "loss_itc": 1.0, "loss_itm": 0.5, "loss_lm": 2.0}, step=step)
    tracker.log_loss_curve()
    tracker.end("FAILED")
    again = RunTracker.reopen(uri, tracker.run_id)
    again.log_metrics({"loss": 0.5}, step=15)
    again.end()
    run = again.client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"run.init_lr": "0.0001"}
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert [s for s, _ in again.metric_history("loss")] == [5, 10, 15]
    files = {a.path for a in again.client.list_artifacts(tracker.run_id, "plots")} | \
            {a.path for a in again.client.list_artifacts(tracker.run_id, "config")}
    assert files == {"plots/loss_curve.png", "config/resolved.yaml"}
    # artifacts live next to the sqlite store, not in the CWD
    assert str(tmp_path) in run.info.artifact_uri
    assert RunTracker.find_by_train_key(uri, "exp-a", "/s/name") == tracker.run_id
    assert RunTracker.find_by_train_key(uri, "exp-a", "/other") is None
    with pytest.raises(Exception):
        RunTracker.reopen(uri, "0" * 32)


def test_a_stopped_driver_ends_its_run_killed_and_a_broken_one_failed():
    """`ray job stop` SIGTERMs the driver; ray.init's handler exits, which Ray re-raises as SystemExit(1)."""
    import os
    import signal

    assert end_status(KeyboardInterrupt()) == "KILLED"  # Ctrl+C
    assert end_status(SystemExit(1)) == end_status(RuntimeError("boom")) == "FAILED"
    previous = signal.getsignal(signal.SIGTERM)
    seen: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # stands for ray.init's handler
    try:
        signals.watch_stop_signal()
        signals.watch_stop_signal()  # idempotent: one note per signal, the previous handler still called
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
        assert end_status(SystemExit(1)) == "KILLED"
    finally:
        signal.signal(signal.SIGTERM, previous)
        signals.clear_stop_signals()


def test_sigterm_closes_the_open_run_killed_before_the_slow_exit_and_leaves_a_closed_run_alone(tmp_path: Path):
    """`ray job stop` SIGKILLs the driver 3 s after its SIGTERM. Ray's own handler then aborts the Train
    controller, which on a busy machine took longer, and the run stayed RUNNING. The run is closed KILLED
    before that handler runs; a run already closed keeps its status when a SIGTERM comes later."""
    import os
    import signal

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    previous = signal.getsignal(signal.SIGTERM)
    status_when_ray_handles_it: list[str] = []
    # stands for ray.init's handler (abort, then exit): what it finds is what a SIGKILL 3 s later would leave
    signal.signal(signal.SIGTERM, lambda signum, frame: status_when_ray_handles_it.append(RunTracker.status(uri, run)))
    try:
        tracker = RunTracker.start(uri, "stops")
        run = tracker.run_id
        os.kill(os.getpid(), signal.SIGTERM)
        assert status_when_ray_handles_it == ["KILLED"]
        done = RunTracker.start(uri, "stops")
        done.end("FINISHED")
        os.kill(os.getpid(), signal.SIGTERM)
        assert RunTracker.status(uri, done.run_id) == "FINISHED"
    finally:
        signal.signal(signal.SIGTERM, previous)
        signals.clear_stop_signals()


def test_a_new_sqlite_store_keeps_every_artifact_location_beside_it(tmp_path, monkeypatch):
    """Created from a job's working directory (deleted after the job), MLflow's Default experiment once
    pointed at <CWD>/mlruns."""
    from qformer.tracking.uri import ensure_experiment

    cwd = tmp_path / "job_working_dir"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    ensure_experiment(uri, "exp")
    from mlflow.tracking import MlflowClient

    experiments = MlflowClient(tracking_uri=uri).search_experiments()
    assert {e.name for e in experiments} == {"Default", "exp"}
    for exp in experiments:
        assert exp.artifact_location.startswith((tmp_path / "store" / "artifacts").as_uri()), exp.artifact_location
    assert not any(cwd.iterdir())

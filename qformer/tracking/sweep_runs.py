"""The sweep's MLflow side: the parent run, its child (trial) runs, orphan clean-up, result artifacts.

All calls go through an explicit MlflowClient(tracking_uri) so the driver never depends on global
MLflow state (a trial's training code sets its own).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.entities import Run, RunStatus
from mlflow.tracking import MlflowClient

from qformer.core.logs import get_logger

log = get_logger(__name__)
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "qformer.sweep"


def start_parent(client: MlflowClient, experiment_id: str, name: str, params: dict[str, Any],
                 inputs: dict[str, Path], sweep_dir: Path) -> str:
    """The sweep's parent run: its settings as params, and its input files (`{artifact folder: file}`), logged
    as files because the paths in the params may name a job's deleted copy, or a file edited since."""
    run = client.create_run(experiment_id, run_name=name,
                            tags={SWEEP_TAG: name, "qformer.sweep_dir": str(sweep_dir), "qformer.kind": "sweep"})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value))
    for folder, file in inputs.items():
        client.log_artifact(run.info.run_id, str(file), artifact_path=folder)
    return run.info.run_id


def reopen_parent(client: MlflowClient, run_id: str) -> None:
    """A resumed sweep continues its parent run (it was left KILLED or FAILED by the interruption)."""
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))


def child_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list[Run]:
    return list(client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                   max_results=10_000))


def close_orphans(client: MlflowClient, runs: list[Run], stopped: frozenset[str] = frozenset()) -> list[str]:
    """Children still RUNNING after tuner.fit() belong to trials the scheduler killed: mark them KILLED.
    So are the `stopped` (early-stopped trials') runs left FAILED: the kill can reach the trial's own
    error handler, which closes the run FAILED, before the process dies."""
    closed = []
    for run in runs:
        if run.info.status == "RUNNING" or (run.info.status == "FAILED" and run.info.run_id in stopped):
            client.set_terminated(run.info.run_id, "KILLED")
            client.set_tag(run.info.run_id, "qformer.stopped_by", "tune scheduler (run was left open)")
            closed.append(run.info.run_id)
    if closed:
        log.info("marked %d orphaned trial run(s) KILLED: %s", len(closed), ", ".join(closed))
    return closed


def tag_trial(client: MlflowClient, run_id: str, row: Any) -> None:
    """What the sweep knows about a trial, on its run: id, early stop, last checkpoint (a stopped trial's
    run never reaches the training's own end-of-run checkpoint logging)."""
    tags = {"qformer.trial_id": row.trial_id, "qformer.stopped_early": str(row.stopped_early).lower()}
    if row.checkpoint_path:
        tags["qformer.last_checkpoint"] = str(row.checkpoint_path)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def finish_parent(client: MlflowClient, run_id: str, files: list[Path], metrics: dict[str, float],
                  tags: dict[str, Any], status: str = "FINISHED") -> None:
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="sweep")
    if metrics:
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value))
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
    client.set_terminated(run_id, status)

"""End to end: a 3-trial ASHA sweep of the tiny config on synthetic data, on the session's local Ray.

Trials train through `qformer train`'s launcher (1 Train worker at half a CPU + a quarter-CPU trial
driver, 2 trials at a time). The learning rates are a grid so the outcome does not hang on luck:
the two trials that start first learn (3e-3), the one that starts later barely moves (1e-8), so when
it reaches ASHA's first rung (after epoch 0) both earlier results are already recorded and better.
The metric is the epoch's mean training loss (min): continuous, so no ties at the rung.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from qformer.config import ConfigError, load_config
from qformer.jobs.sweep.run import run_sweep
from qformer.jobs.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
TINY_SWEEP = REPO / "experiments" / "sweeps" / "tiny_lr_queries.yaml"
TINY_BASE = REPO / "experiments" / "demo" / "tiny_shapes.yaml"
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def sweep_options(root: Path, bert: Path) -> list[str]:
    return [
        f"model.bert_model={bert}",  # the test BERT (the sweep itself varies num_query_token)
        f"run.data_root={root / 'data'}",
        f"run.mlflow.tracking_uri=sqlite:///{root / 'mlflow' / 'mlflow.db'}",
        "run.mlflow.experiment_name=tune-test",
        f"tune.storage_path={root / 'sweeps'}",
        f"run.ray.storage_path={root / 'train'}",
        "tune.metric=train_epoch/loss", "tune.mode=min",
        "tune.search_space.run.init_lr={grid: [3.0e-3, 3.0e-3, 1.0e-8]}",
        "run.max_steps_per_epoch=5",  # 5 steps at 3e-3 lower the epoch's mean loss well past what the query count moves
        "run.min_lr=0.0",  # 1e-8 is below the base's min_lr, which the sweep would refuse
        "tune.num_samples=1",
        "run.max_epoch=2", "tune.scheduler.max_t=2",
        "run.warmup_lr=-1",  # the first step already trains at the sampled lr
        "run.valid_splits=[]", "run.test_splits=[]",  # ranked on the training loss: no retrieval evals
    ]


@pytest.fixture(scope="module")
def sweep(ray_cluster, tiny_bert, tmp_path_factory):
    from qformer.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("tune_e2e")
    write_synthetic(root / "data" / "synth_shapes", n_train=16, n_val=8, n_test=4, seed=0, image_size=64)
    # Run as a `ray job` runs it: from a copy of the repo (its working directory), which is deleted after.
    workdir = root / "job_working_dir"
    shutil.copytree(REPO / "experiments", workdir / "experiments")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        spec = load_sweep("experiments/sweeps/tiny_lr_queries.yaml", sweep_options(root, tiny_bert))
        printed: list[str] = []
        outcome = run_sweep(spec, print_fn=printed.append)
    finally:
        os.chdir(cwd)
    shutil.rmtree(workdir)
    return spec, outcome, "\n".join(printed), root


def test_asha_stops_a_late_weak_trial_early(sweep):
    spec, outcome, _, _ = sweep
    assert len(outcome.rows) == 3
    assert all(r.status == "ok" for r in outcome.rows), [(r.trial_id, r.status) for r in outcome.rows]
    early = [r for r in outcome.rows if r.stopped_early]
    assert early, "ASHA stopped no trial"
    assert all(r.iterations <= 2 for r in early)  # a 3e-3 trial may also be cut at the top rung (2)
    [late] = [r for r in outcome.rows if int(r.trial_id.rsplit("_", 1)[1]) == 2]  # grid order: the 1e-8 trial
    assert late.sampled["run.init_lr"] == pytest.approx(1e-8) and late.stopped_early and late.iterations == 1
    full = [r for r in outcome.rows if not r.stopped_early]
    assert full and all(r.iterations == 2 for r in full)
    assert not outcome.interrupted
    assert outcome.best is not None and outcome.best.sampled["run.init_lr"] == pytest.approx(3e-3)
    assert outcome.best.metric == min(r.metric for r in outcome.rows)


def test_mlflow_parent_and_one_child_per_trial(sweep):
    spec, outcome, _, _ = sweep
    client = MlflowClient(tracking_uri=outcome.tracking_uri)  # the sqlite store itself: the server is gone
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["metric"] == "train_epoch/loss"
    assert {a.path for a in client.list_artifacts(outcome.parent_run_id, "sweep")} == {
        "sweep/results.csv", "sweep/metric_vs_lr.png", "sweep/best_config.yaml"}
    children = client.search_runs([outcome.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    assert len(children) == 3
    by_id = {c.info.run_id: c for c in children}
    for row in outcome.rows:
        child = by_id[row.mlflow_run_id]
        assert float(child.data.params["run.init_lr"]) == pytest.approx(row.sampled["run.init_lr"])
        assert int(child.data.params["model.num_query_token"]) == row.sampled["model.num_query_token"]
        assert child.info.status == ("KILLED" if row.stopped_early else "FINISHED")
        assert "train_epoch/loss" in child.data.metrics  # the trial's own training metrics
        assert child.data.tags["qformer.trial_id"] == row.trial_id
        assert child.data.tags["qformer.stopped_early"] == str(row.stopped_early).lower()
        assert child.data.tags["qformer.last_checkpoint"]  # every trial reported an epoch-end checkpoint
    assert set(outcome.closed_orphans) == {r.mlflow_run_id for r in outcome.rows if r.stopped_early}


def test_results_on_disk_and_printed(sweep):
    spec, outcome, printed, _ = sweep
    results_dir = outcome.sweep_dir / "results"
    assert (results_dir / "results.csv").read_text().count("\n") == 4
    assert (results_dir / "metric_vs_lr.png").read_bytes()[:4] == b"\x89PNG"
    assert "stopped early" in printed and "init_lr" in printed and "num_query_token" in printed
    assert f"qformer train --cfg-path {results_dir / 'best_config.yaml'}" in printed


def test_no_sweep_record_points_into_the_deleted_working_dir(sweep, tmp_path):
    """Params, state file, best-config header and every MLflow location outlive the job's working directory;
    the sweep file and its base are kept as artifacts of the parent run."""
    spec, outcome, _, root = sweep
    workdir = str(root / "job_working_dir")
    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.params["sweep_file"] == "experiments/sweeps/tiny_lr_queries.yaml"  # as in the repo
    assert parent.data.params["base"] == "experiments/demo/tiny_shapes.yaml"
    for artifact, source in (("inputs/sweep/tiny_lr_queries.yaml", TINY_SWEEP),
                             ("inputs/base/tiny_shapes.yaml", TINY_BASE)):
        kept = client.download_artifacts(parent.info.run_id, artifact, str(tmp_path))
        assert Path(kept).read_text() == source.read_text()
    children = client.search_runs([outcome.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    records = {
        "state": (outcome.sweep_dir / "qformer_sweep.json").read_text(),
        "best_config": outcome.files["best_config"].read_text(),
        **{f"experiment {e.name}": e.artifact_location for e in client.search_experiments()},
        **{f"run {r.info.run_id}": json.dumps([r.info.artifact_uri, r.data.params, r.data.tags])
           for r in [parent, *children]},
    }
    assert {name for name, text in records.items() if workdir in text} == set()
    assert json.loads(records["state"])["sweep_file"] == "experiments/sweeps/tiny_lr_queries.yaml"


def test_best_config_loads_and_trains_a_new_run(sweep):
    """The retrain YAML once kept the base experiment's output_dir, hence its Ray run name: `qformer train` on
    it continued the base's earlier run (same MLflow run, "start at epoch 1") instead of starting its own."""
    from qformer.jobs.train_job import launch_training

    spec, outcome, _, root = sweep
    path = outcome.files["best_config"]
    cfg = load_config(str(path))
    assert cfg.run.init_lr == pytest.approx(outcome.best.sampled["run.init_lr"])
    assert cfg.model.num_query_token == outcome.best.sampled["model.num_query_token"]
    short = ["run.max_epoch=1", "run.max_steps_per_epoch=1", "run.valid_splits=[]", "run.ray.num_workers=0"]
    earlier = launch_training(load_config(str(TINY_BASE), [*spec.base_options, *short]))  # e.g. the demo's run
    assert earlier.error is None and earlier.mlflow_run_id
    result = launch_training(load_config(str(path), short))
    assert result.error is None and result.metrics["step"] == 1  # trained from step 0, not resumed
    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    trial_runs = {r.mlflow_run_id for r in outcome.rows}
    assert result.mlflow_run_id not in {earlier.mlflow_run_id, *trial_runs}
    assert client.get_run(earlier.mlflow_run_id).info.status == "FINISHED"  # untouched by the retrain
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == f"{spec.name}_best_{outcome.best.trial_id}"


def test_existing_sweep_needs_resume_and_resume_restores(sweep, tiny_bert):
    spec, outcome, _, root = sweep
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(load_sweep(TINY_SWEEP, sweep_options(root, tiny_bert)))
    again = run_sweep(load_sweep(TINY_SWEEP, sweep_options(root, tiny_bert)), resume=True, print_fn=lambda *_: None)
    assert again.parent_run_id == outcome.parent_run_id  # the same parent run, reopened and finished again
    assert sorted(r.trial_id for r in again.rows) == sorted(r.trial_id for r in outcome.rows)
    assert [r.iterations for r in again.rows] == [r.iterations for r in outcome.rows]  # nothing re-ran


def test_interrupted_sweep_is_killed_and_its_resume_continues_the_iteration_count(ray_cluster, tiny_bert, tmp_path,
                                                                                    monkeypatch):
    """SIGINT to the driver (Ctrl+C) as Tune takes the trial's first result: Tune stops the trial and fit()
    returns. The sweep says so, names no best trial, tells how to resume and leaves its parent run KILLED.
    `--resume` restores the trial, whose Train run resumes from its last epoch checkpoint, and its Tune
    iteration count goes on from there."""
    import signal

    from qformer.data.synth import write_synthetic
    from qformer.jobs.sweep import driver

    write_synthetic(tmp_path / "data" / "synth_shapes", n_train=16, n_val=8, n_test=4, seed=0, image_size=64)
    options = [*sweep_options(tmp_path, tiny_bert), "tune.name=interrupted", "tune.search_space.run.init_lr={grid: [1.0e-3]}",
               "tune.search_space.model.num_query_token={choice: [4]}", "run.max_epoch=2", "tune.scheduler.max_t=2",
               "run.max_steps_per_epoch=2"]
    on_result = driver.EarlyStopMarker.on_trial_result
    interrupted: list[int] = []

    def interrupt_at_the_first_result(self, iteration, trials, trial, result, **info):
        on_result(self, iteration, trials, trial, result, **info)
        if not interrupted:  # the driver's main thread, inside fit(): Tune's own SIGINT handler takes it
            interrupted.append(result["training_iteration"])
            signal.raise_signal(signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    printed: list[str] = []
    spec = load_sweep(TINY_SWEEP, options)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(driver.EarlyStopMarker, "on_trial_result", interrupt_at_the_first_result)
            first = run_sweep(spec, print_fn=printed.append)
        client = MlflowClient(tracking_uri=first.tracking_uri)
        parent_status = client.get_run(first.parent_run_id).info.status
        signal.signal(signal.SIGINT, handler)
        resumed = run_sweep(load_sweep(TINY_SWEEP, options), resume=True, print_fn=lambda *_: None)
        resumed_status = client.get_run(resumed.parent_run_id).info.status
    finally:
        signal.signal(signal.SIGINT, handler)

    text = "\n".join(printed)
    [row] = first.rows
    assert interrupted == [1] and first.interrupted and first.best is None and not row.finished, text
    assert row.iterations == 1, text  # stopped at the result that raised the signal
    assert "INTERRUPTED" in text and "retrain" not in text and "best_config" not in first.files
    assert spec.command("--resume") in text and "--options" in spec.command()  # the same options again
    assert parent_status == "KILLED"

    [again] = resumed.rows
    assert resumed.parent_run_id == first.parent_run_id and not resumed.interrupted
    # 2 only when both go on: a Train run restarted from epoch 0 would end at iteration 3, a Tune count restarted
    # at 0 (Train resuming at epoch 1) at iteration 1
    assert again.finished and again.iterations == 2, (row.iterations, again.iterations)
    assert again.mlflow_run_id == row.mlflow_run_id  # the same training, continued
    assert resumed_status == "FINISHED"


def test_invalid_search_space_key_fails_before_any_trial(tmp_path, tiny_bert):
    options = [*sweep_options(tmp_path, tiny_bert), "tune.search_space.run.init_lrr={loguniform: [1e-5, 1e-3]}"]
    with pytest.raises(ConfigError, match=r"tune\.search_space\.run\.init_lrr.*did you mean run\.init_lr"):
        run_sweep(load_sweep(TINY_SWEEP, options))
    assert not (tmp_path / "sweeps").exists()  # no Tune experiment
    assert not (tmp_path / "mlflow").exists()  # no MLflow run


def test_placement_group_of_a_killed_creator_is_released(ray_cluster):
    """What an ASHA-stopped trial leaves: a placement group whose creator (the Train controller) is dead."""
    import ray
    from ray.util.placement_group import placement_group

    from qformer.jobs.sweep.placement_groups import release_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Creator:
        def reserve(self) -> str:
            pg = placement_group([{"CPU": 0.01}])
            ray.get(pg.ready())
            return pg.id.hex()

    creator = Creator.remote()
    orphan = ray.get(creator.reserve.remote())
    kept = placement_group([{"CPU": 0.01}])  # created by this driver: must survive
    ray.get(kept.ready())
    ray.kill(creator)
    import time

    released: list[str] = []
    for _ in range(50):  # the GCS learns of the death asynchronously
        released += release_orphaned_placement_groups()
        if orphan in released:
            break
        time.sleep(0.2)
    assert orphan in released
    assert ray.util.placement_group_table(kept)["state"] == "CREATED"
    ray.util.remove_placement_group(kept)


def test_a_restored_trial_whose_training_had_finished_reports_its_last_result_again(ray_cluster, tmp_path):
    """A sweep stopped while a trial's Train run completes its last epoch: on --resume the trial trains
    nothing (the run is finished) and hands its last checkpoint's report to Tune, so the trial ends with
    that result and the iteration count it reached (4 after epoch 3), not the one before the stop."""
    from ray import tune

    from qformer.jobs.sweep.trainable import MetricReportCallback

    def trial(config):
        MetricReportCallback("train_epoch/loss", [], 1).report_finished(
            {"epoch": 3, "step": 12, "train_epoch/loss": 0.5}, "/runs/epoch=0003-step=00000012-end")

    trainable = tune.with_resources(trial, {"CPU": 0.25})  # as a sweep's trial driver
    grid = tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=str(tmp_path), name="finished")).fit()
    result = grid[0]
    assert result.error is None
    assert result.metrics["training_iteration"] == 4 and result.metrics["train_epoch/loss"] == 0.5
    assert result.metrics["checkpoint_path"] == "/runs/epoch=0003-step=00000012-end"

"""The sweep's driver, after qformer.jobs.sweep.run.run_sweep has validated the sweep file: MLflow parent
run (behind a private server when the store is sqlite) -> Tuner.fit() (or Tuner.restore(...) with
resume=True) -> close orphaned trial runs -> results CSV, plot and best config on disk and on the parent
run -> printed table.
"""
from __future__ import annotations

import json
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from omegaconf import DictConfig
from ray import tune
from ray.tune import Tuner
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from qformer.core.errors import ConfigError
from qformer.core.logs import get_logger
from qformer.core.paths import output_dir
from qformer.data import stats
from qformer.jobs.ray_cluster import connect_ray
from qformer.jobs.sweep import results
from qformer.jobs.sweep.best_config import retrain_command, write_best_config
from qformer.jobs.sweep.early_stop import EarlyStopMarker
from qformer.jobs.sweep.placement_groups import PlacementGroupReaper, release_orphaned_placement_groups
from qformer.jobs.sweep.results import TrialRow
from qformer.jobs.sweep.spec import SweepSpec
from qformer.jobs.sweep.trainable import TrialPlumbing, train_run_name, train_trial
from qformer.tracking import sweep_runs as mlflow_runs
from qformer.tracking.server import is_sqlite, local_tracking_server
from qformer.tracking.uri import ensure_experiment, mlflow_client, resolve_tracking_uri, sqlite_artifact_root

log = get_logger(__name__)
STATE_FILE = "qformer_sweep.json"  # parent run id etc., next to Tune's own experiment state
RESULTS_DIR = "results"


@dataclass
class SweepOutcome:
    sweep_dir: Path
    rows: list[TrialRow]
    best: TrialRow | None
    files: dict[str, Path] = field(default_factory=dict)  # csv, plot, best_config
    parent_run_id: str | None = None
    tracking_uri: str | None = None  # the store (never the sweep's temporary server)
    experiment_id: str | None = None
    closed_orphans: list[str] = field(default_factory=list)
    interrupted: bool = False  # Tune ended with unfinished trials (Ctrl+C, driver stop): resume with --resume


def sweep_dir_for(spec: SweepSpec, base: DictConfig) -> Path:
    """<tune.storage_path>/<tune.name>; default storage is <run.output_dir>/sweeps."""
    root = spec.storage_path or str(output_dir(base.run.output_dir) / "sweeps")
    if "://" in root:
        raise ConfigError(f"{spec.sweep_path}: tune.storage_path {root}: only local/NFS paths are supported "
                          "for the sweep's own results (Train checkpoints follow run.ray.storage_path)")
    return Path(root).expanduser().resolve() / spec.name


def tracking_uri_for(base: DictConfig) -> str:
    """The store `qformer train` would log to (run.mlflow.tracking_uri, MLFLOW_TRACKING_URI, embedded sqlite)."""
    return resolve_tracking_uri(base.run.mlflow.tracking_uri)


def drive(spec: SweepSpec, base: DictConfig, resume: bool = False, print_fn=print) -> SweepOutcome:
    """The sweep of `spec` over `base` (validate_sweep's result)."""
    sweep_dir = sweep_dir_for(spec, base)
    state = _check_sweep_dir(spec, sweep_dir, resume)
    mlflow_on = bool(base.run.mlflow.enabled)
    store_uri = tracking_uri_for(base) if mlflow_on else None

    outcome = SweepOutcome(sweep_dir=sweep_dir, rows=[], best=None, tracking_uri=store_uri)
    if mlflow_on:
        # Created before the server starts, by the same helper as `qformer train` (same artifact location).
        outcome.experiment_id = ensure_experiment(store_uri, str(base.run.mlflow.experiment_name))
    with ExitStack() as stack:
        uri = stack.enter_context(_tracking(store_uri, sweep_dir)) if mlflow_on else None
        client = None
        if mlflow_on:
            client = mlflow_client(uri)
            if state.get("parent_run_id"):
                outcome.parent_run_id = state["parent_run_id"]
                mlflow_runs.reopen_parent(client, outcome.parent_run_id)
            else:
                outcome.parent_run_id = mlflow_runs.start_parent(
                    client, outcome.experiment_id, spec.name, spec.mlflow_params(), spec.input_files(), sweep_dir)
        _write_state(sweep_dir, {"parent_run_id": outcome.parent_run_id, "experiment_id": outcome.experiment_id,
                                 "tracking_uri": store_uri, "sweep_file": spec.shown(spec.sweep_path)})
        try:
            grid = _fit(spec, base, sweep_dir, uri, outcome.parent_run_id, resume=resume)
        except BaseException:
            if client is not None:  # interrupted or broken: no run stays RUNNING; --resume reopens the parent
                mlflow_runs.close_orphans(client, mlflow_runs.child_runs(client, outcome.experiment_id,
                                                                         outcome.parent_run_id))
                client.set_terminated(outcome.parent_run_id, "KILLED")
            raise
        _report(spec, grid, outcome, client, print_fn)
    return outcome


def _check_sweep_dir(spec: SweepSpec, sweep_dir: Path, resume: bool) -> dict[str, Any]:
    exists = sweep_dir.exists() and Tuner.can_restore(str(sweep_dir))
    if resume and not exists:
        raise ConfigError(f"{spec.sweep_path}: --resume: no sweep to resume at {sweep_dir} (tune.name={spec.name})")
    if not resume and exists:
        raise ConfigError(f"{spec.sweep_path}: a sweep already exists at {sweep_dir}: pass --resume to continue it, "
                          f"or choose another tune.name / tune.storage_path")
    state_path = sweep_dir / STATE_FILE
    return json.loads(state_path.read_text()) if resume and state_path.is_file() else {}


def _write_state(sweep_dir: Path, state: dict[str, Any]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / STATE_FILE).write_text(json.dumps(state, indent=2))


def _tracking(store_uri: str, sweep_dir: Path):
    """The URI trials log to: a private server over a sqlite store (see mlflow_server.py), else the store itself."""
    if not is_sqlite(store_uri):
        return nullcontext(store_uri)
    Path(store_uri.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    return local_tracking_server(store_uri, sqlite_artifact_root(store_uri), sweep_dir / "mlflow_server.log")


def _fit(spec: SweepSpec, base: DictConfig, sweep_dir: Path, uri: str | None, parent_run_id: str | None,
         resume: bool):
    connect_ray(base)  # as `qformer train`: run.ray.address / RAY_ADDRESS / a job's cluster, else a local Ray
    plumbing = TrialPlumbing(parent_run_id=parent_run_id, tracking_uri=uri,
                             train_storage_path=base.run.ray.storage_path)
    trainable = tune.with_resources(tune.with_parameters(train_trial, spec=spec, plumbing=plumbing),
                                    dict(spec.resources_per_trial))
    if resume:
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={key: dim.to_tune() for key, dim in spec.search_space.items()},
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                max_concurrent_trials=None if spec.seed is not None else spec.max_concurrent_trials,
                scheduler=_scheduler(spec), search_alg=_search_alg(spec), trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(sweep_dir.parent),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                callbacks=[EarlyStopMarker(), PlacementGroupReaper()],
                verbose=1),
        )
    counter = stats.start_counter()  # one skipped-image counter for all trials (owned here); killed after the sweep
    try:
        return tuner.fit()
    finally:
        if counter is not None:
            ray.kill(counter)
        _release_after_fit()


def _release_after_fit(watch_s: float = 3.0) -> None:
    """The last stopped trials' controllers die just after fit() returns: keep releasing for a moment,
    so a driver that goes on using the cluster (a notebook, a test session) gets its CPUs back."""
    deadline = time.monotonic() + watch_s
    while True:
        try:
            release_orphaned_placement_groups()
        except Exception as err:  # noqa: BLE001 - clean-up must not hide the sweep's result
            log.warning("placement group clean-up failed: %s", err)
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.5)


def _scheduler(spec: SweepSpec):
    s = spec.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: a trial that reaches max_t is not killed but ends on its own, so its
    # training finishes normally (final evaluation, checkpoint, MLflow run FINISHED).
    return ASHAScheduler(time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, stop_last_trials=False)


def _search_alg(spec: SweepSpec):
    if spec.seed is None:
        return None

    # A search_alg instance makes Tune ignore TuneConfig.max_concurrent_trials: the limit must go here too,
    # else every trial driver starts at once and their Train workers starve Ray Data of CPUs.
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent_trials or 0)


def _report(spec: SweepSpec, grid, outcome: SweepOutcome, client, print_fn) -> None:
    rows = results.rows_from_result_grid(grid, spec)
    if client is not None:
        children = mlflow_runs.child_runs(client, outcome.experiment_id, outcome.parent_run_id)
        by_name = {run.info.run_name: run for run in children}
        stopped = frozenset(by_name[name].info.run_id for name in
                            (train_run_name(spec, row.trial_id) for row in rows if row.stopped_early) if name in by_name)
        outcome.closed_orphans = mlflow_runs.close_orphans(client, children, stopped)
        for row in rows:
            run = by_name.get(train_run_name(spec, row.trial_id))
            if run is not None:
                row.mlflow_run_id = run.info.run_id
                row.mlflow_status = "KILLED" if run.info.run_id in outcome.closed_orphans else run.info.status
                mlflow_runs.tag_trial(client, run.info.run_id, row)
    outcome.rows = rows
    # On SIGINT Tune stops its trials and fit() *returns*, the stopped trials TERMINATED like finished ones:
    # only a finished trial's last result is marked done. An interrupted sweep names no winner.
    outcome.interrupted = any(r.status == "ok" and not r.finished for r in rows)
    outcome.best = None if outcome.interrupted else results.best_row(rows, spec.mode)
    out = outcome.sweep_dir / RESULTS_DIR
    outcome.files["csv"] = results.write_csv(rows, spec, out / "results.csv")
    outcome.files["plot"] = results.plot_metric(rows, spec, out / "metric_vs_lr.png")
    if outcome.best is not None:
        b = outcome.best
        header = (f"best trial {b.trial_id} of sweep {spec.name} ({spec.shown(spec.sweep_path)}): "
                  f"{spec.metric}={b.metric} "
                  f"({spec.mode})\nsampled: {b.sampled}\nretrain: {retrain_command(out / 'best_config.yaml')}")
        outcome.files["best_config"] = write_best_config(spec, b.sampled, b.trial_id, out / "best_config.yaml",
                                                       header)

    if client is not None:
        metrics = {f"best_{spec.metric}": outcome.best.metric} if outcome.best else {}
        tags = {"best_trial": outcome.best.trial_id} if outcome.best else {}
        if outcome.best and outcome.best.mlflow_run_id:
            tags["best_run_id"] = outcome.best.mlflow_run_id
        errored = sum(r.status == "error" for r in rows)
        status = "KILLED" if outcome.interrupted else ("FAILED" if rows and errored == len(rows) else "FINISHED")
        mlflow_runs.finish_parent(client, outcome.parent_run_id, list(outcome.files.values()), metrics, tags,
                                  status=status)

    if outcome.interrupted:
        done = sum(r.finished or r.status == "error" for r in rows)
        print_fn(f"\nsweep {spec.name}: INTERRUPTED, {done} of {len(rows)} trials finished; partial results in {out}")
        print_fn(results.format_table(rows, spec, None))
        print_fn(f"\nno best trial yet; continue the sweep (unfinished trials resume from their checkpoints) with:\n"
                 f"  {spec.command('--resume')}")
        return
    print_fn(f"\nsweep {spec.name}: {len(rows)} trials, results in {out}")
    print_fn(results.format_table(rows, spec, outcome.best))
    if outcome.best is not None:
        print_fn(f"\nbest: trial {outcome.best.trial_id}, {spec.metric}={outcome.best.metric:.4g}")
        print_fn(f"retrain it with:\n  {retrain_command(outcome.files['best_config'])}")
    else:
        print_fn("\nno trial reported the metric " + spec.metric)

"""Launch training on Ray Train V2: checks before Ray, datasets, the TorchTrainer and its LoopConfig, storage/name
for auto-resume; the MLflow run is opened and closed through qformer.tracking.training_run.

Resume rules (Train V2 has no Trainer.restore): a run re-launched with the same storage path and name
continues from its latest checkpoint (failure restarts do the same within one fit()). The name is
deterministic (run.ray.name, else derived from output_dir), so re-running a command resumes it. An
explicit `--resume PATH` (or LAVIS's run.resume_ckpt_path) is used only when the Ray run has no
checkpoint of its own. Either way the MLflow run id stored in the checkpoint is reopened, so one
training = one MLflow run.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import ray
import ray.data
import ray.train
from omegaconf import DictConfig, OmegaConf
from ray.train.torch import TorchTrainer

from qformer.config import batch_plan
from qformer.core import paths
from qformer.core.logs import get_logger
from qformer.data.pipeline import build_train_datasets, train_sources
from qformer.data.position import create_plan
from qformer.data.preflight import check_images
from qformer.evaluate.in_training import evaluate_split
from qformer.features import dataset as cached_train_datasets
from qformer.jobs.elastic_capacity import RefreshCapacityOnRetry
from qformer.jobs.elastic_grow import GrowAtStepBoundary, ray_resize_interval
from qformer.jobs.ray_cluster import connect_ray, use_gpu
from qformer.tracking.run_tracker import end_status
from qformer.tracking.training_run import best_checkpoint_path, finish_tracking, score_key, start_tracking
from qformer.tracking.uri import check_reachable, resolve_tracking_uri
from qformer.train.checkpoint import check_readable
from qformer.train.loop_config import LoopConfig, StepHook, TrackingTarget
from qformer.train.resume import check_config_unchanged, find_prior, finished
from qformer.train.worker import train_loop_per_worker

log = get_logger("train")


@dataclass
class TrainingResult:
    """What a finished training leaves behind."""

    metrics: dict  # the last report's metrics (rank 0)
    checkpoint_path: str | None  # latest checkpoint directory
    best_checkpoint_path: str | None
    mlflow_run_id: str | None
    tracking_uri: str | None
    storage_path: str
    name: str
    error: BaseException | None = None
    finished: bool = False  # True: the run had already finished; nothing was trained (nor logged) this time


def run_name(cfg: DictConfig) -> str:
    """run.ray.name, else a name derived from output_dir: deterministic, no timestamps (re-launch = resume)."""
    if cfg.run.ray.get("name"):
        return str(cfg.run.ray.name)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(cfg.run.output_dir).strip("/")) or "train"
    return base


def storage_path(cfg: DictConfig) -> str:
    configured = cfg.run.ray.get("storage_path")
    if configured:
        return configured if "://" in str(configured) else str(Path(str(configured)).expanduser().resolve())
    return str(paths.output_dir(str(cfg.run.output_dir)) / "ray_results")


def _resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def build_trainer(cfg: DictConfig, *, resume: str | None = None, callbacks: Sequence[Any] | None = None,
                  parent_run_id: str | None = None, name: str | None = None, storage: str | None = None,
                  local_mode: bool | None = None, step_hooks: Sequence[StepHook] = (), sources=None):
    """The TorchTrainer for `cfg` plus its MLflow tracker: `(trainer, tracker_or_None)`. Ray must be connected.
    `sources`: `qformer.data.pipeline.train_sources(cfg)` when the caller has already read them.

    For sweeps (qformer.jobs.sweep.run): call this inside a Tune function trainable with
    `callbacks=[ray.tune.integration.ray_train.TuneReportCallback()]` (constructed inside the trial),
    `parent_run_id=<the sweep's MLflow run>` (the training's run is nested under it) and a deterministic
    `name` per trial (e.g. f"trial-{trial_id}") so a retried trial resumes; then `trainer.fit()` and
    `finish_tracking(tracker, result)`. Reported metrics (rank 0): at checkpoints `epoch`, `step`, `loss`,
    `lr`; at epoch ends `train_epoch/loss*` and `<valid split>/<metric>` (e.g. `val/r_mean`), and at the end
    `<test split>/<metric>`. `local_mode=True` forces Train local mode (num_workers=0, single process).
    `step_hooks`: callables `hook(step, rank)` every rank runs after each optimiser step (tests inject faults
    with them); `QFORMER_STEP_HOOKS` adds more by import path (see `env_hooks`).
    """
    name = name or run_name(cfg)
    storage = storage or storage_path(cfg)
    workers = (0, 0) if local_mode else batch_plan.worker_range(cfg.run.ray.num_workers)
    num_workers = workers[1]  # the fixed size, or the elastic maximum (0: Train local mode)
    gpu = use_gpu(cfg) if num_workers > 0 else False
    for warning in batch_plan.check(cfg.run):  # errors were raised when the config was validated
        log.warning("%s", warning)
    resume = resume or cfg.run.get("resume_ckpt_path") or None
    if resume and "://" not in str(resume):  # workers may run elsewhere in the tree: hand them an absolute path
        resume = str(Path(str(resume)).expanduser().resolve())
    run_dir = _run_dir(storage, name)
    local_root = str(run_dir / "local_checkpoints") if num_workers == 0 and run_dir is not None else None
    prior = find_prior(run_dir, resume, local_mode=num_workers == 0)
    if prior is not None and (num_workers == 0 or prior.passed_over):
        # local mode keeps its own checkpoints; past an incomplete newest Ray checkpoint, the good one before it
        resume = str(prior.path)
    resume_run_id = prior.mlflow_run_id if prior is not None else None

    # the training loop shows its own progress bar; Ray Data's per-operator bars would interleave with it. Turning
    # them off makes Ray Data warn "Progress bars disabled" where the stream runs (the driver in Train local mode)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    plan = create_plan()  # the loop tells the data sources which pass to read, and what of it is done
    if cfg.run.get("vision_cache"):  # cached frozen-ViT features instead of images (qformer cache-features)
        data = cached_train_datasets(cfg, plan=plan)  # ConfigError naming run.vision_cache if the cache doesn't match
    else:
        data = build_train_datasets(cfg, sources, plan=plan)
    tracker = start_tracking(cfg, name, storage, resume_run_id, parent_run_id,
                             num_workers if workers[0] == workers[1] else f"{workers[0]}-{workers[1]}", gpu)

    best_by = score_key(cfg)
    checkpoint_config = ray.train.CheckpointConfig(
        num_to_keep=int(cfg.run.keep_checkpoints) or None,  # 0: keep all (Ray's None)
        checkpoint_score_attribute=best_by,
        checkpoint_score_order="max",
    )
    loop_config = LoopConfig(
        cfg=_resolved(cfg),
        workers=(max(1, workers[0]), max(1, workers[1])),  # what the batch plan of each world size is made for
        tracking=TrackingTarget(tracker.uri, tracker.run_id) if tracker else None,
        resume_path=resume, ratios=data.ratios, num_rows=dict(data.num_rows),
        image_mean=tuple(data.mean), image_std=tuple(data.std), stream_plan=plan, score_key=best_by,
        local_checkpoint_root=local_root, evaluate=evaluate_split, step_hooks=tuple(step_hooks or ()) + env_hooks(),
    )
    for hook in loop_config.step_hooks:  # a hook from a test module travels by value: workers cannot import it
        if not type(hook).__module__.startswith("qformer"):
            ray.cloudpickle.register_pickle_by_value(sys.modules[type(hook).__module__])
    resources = cfg.run.ray.get("resources_per_worker")
    is_elastic, interval = workers[0] != workers[1], float(cfg.run.ray.elastic_resize_interval_s)
    grow_checkpoint = is_elastic and bool(cfg.run.elastic.grow_checkpoint)
    scaling = ray.train.ScalingConfig(
        num_workers=workers if is_elastic else num_workers, use_gpu=gpu,
        resources_per_worker=dict(OmegaConf.to_container(resources)) if resources else None,
        elastic_resize_monitor_interval_s=ray_resize_interval(interval, grow_checkpoint),
    )
    if is_elastic and int(cfg.run.ray.max_failures) == 0:
        log.warning("run.ray.num_workers is elastic but run.ray.max_failures is 0: a lost node (or a preemption "
                    "or grow checkpoint) ends the run instead of continuing at another size; set it to -1 or more")
    elastic = [RefreshCapacityOnRetry()] if is_elastic else []  # shrink without a wait
    if grow_checkpoint:  # grow from a checkpoint at a step boundary
        elastic.append(GrowAtStepBoundary(scaling, interval))
    run_config = ray.train.RunConfig(
        name=name, storage_path=storage, checkpoint_config=checkpoint_config,
        failure_config=ray.train.FailureConfig(max_failures=int(cfg.run.ray.max_failures),
                                               max_preemption_failures=int(cfg.run.ray.max_preemption_failures)),
        callbacks=[*(callbacks or []), *elastic],
    )
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config, datasets=dict(data.datasets))
    return trainer, tracker


def launch_training(cfg: DictConfig, resume: str | None = None, callbacks: Sequence[Any] | None = None,
                    parent_run_id: str | None = None, local_mode: bool | None = None,
                    step_hooks: Sequence[StepHook] = (), allow_config_change: bool = False) -> TrainingResult:
    """`qformer train`: check on the driver what can be checked (annotations, image folders, the checkpoint
    a re-launch would continue from), connect Ray, build the TorchTrainer, fit, close the MLflow run.
    Bad input fails before Ray starts (AnnotationError / ConfigError naming file, record or key). A run
    whose checkpoint already completed the schedule is reported finished and left alone (result.finished)."""
    sources = None if cfg.run.get("vision_cache") else train_sources(cfg)
    check_images(cfg, [*([] if sources is None else cfg.run.train_splits), *cfg.run.valid_splits,
                       *cfg.run.test_splits], {name: builder for name, builder, _ in sources or []})
    if cfg.run.mlflow.get("enabled", True):  # a tracking server that is down: one line now, not after Ray
        check_reachable(resolve_tracking_uri(cfg.run.mlflow.get("tracking_uri")))
    done = _check_prior(cfg, resume, local_mode, allow_config_change)
    if done is not None:
        return done
    connect_ray(cfg)
    trainer, tracker = build_trainer(cfg, resume=resume, callbacks=callbacks, parent_run_id=parent_run_id,
                                     local_mode=local_mode, step_hooks=step_hooks, sources=sources)
    name, storage = trainer.run_config.name, trainer.run_config.storage_path
    print(f"Ray Train run '{name}' in {storage}", flush=True)
    result = None
    try:
        result = trainer.fit()
    except BaseException as err:
        if tracker is not None:
            status = end_status(err)  # stopped (Ctrl+C, `ray job stop`): KILLED; broken: FAILED
            try:
                tracker.end(status)
            except Exception as track_err:  # noqa: BLE001 - report the training's error, not the tracker's
                log.warning("MLflow: could not mark run %s %s (%s)", tracker.run_id, status, track_err)
        raise
    finally:
        _close_plan(trainer.train_loop_config.stream_plan)
    finish_tracking(tracker, result, cfg)
    checkpoint = result.checkpoint
    return TrainingResult(
        metrics=dict(result.metrics or {}), checkpoint_path=str(checkpoint.path) if checkpoint else None,
        best_checkpoint_path=best_checkpoint_path(result, score_key(cfg)), mlflow_run_id=tracker.run_id if tracker else None,
        tracking_uri=tracker.uri if tracker else None, storage_path=str(storage), name=str(name), error=result.error,
    )


def _close_plan(plan) -> None:
    try:
        plan.close()
    except Exception as err:  # noqa: BLE001 - the training's outcome matters; a few stale bytes in the GCS do not
        log.warning("could not delete the stream plan %s from Ray's key-value store (%s)", plan.key, err)


def finished_run(cfg: DictConfig) -> TrainingResult | None:
    """The run `cfg` names, when its checkpoint already completed the schedule (what `launch_training` would
    report without training); None when there is something to train. Checked on the driver: no Ray."""
    return _check_prior(cfg, None, None, False)


def run_dir(cfg: DictConfig) -> Path | None:
    """The run's Ray Train directory (its checkpoints) when its storage is local."""
    return _run_dir(storage_path(cfg), run_name(cfg))


def _check_prior(cfg: DictConfig, resume: str | None, local_mode: bool | None,
                 allow_config_change: bool) -> TrainingResult | None:
    """Before Ray: stop when the checkpoint to continue from has other model/data settings; return the
    finished run's result when there is nothing left to train."""
    name, storage = run_name(cfg), storage_path(cfg)
    local = bool(local_mode) or batch_plan.worker_range(cfg.run.ray.num_workers)[1] == 0
    explicit = resume or cfg.run.get("resume_ckpt_path") or None
    if explicit:  # not there, or not a checkpoint: one line naming it, before Ray
        check_readable(explicit)
    prior = find_prior(_run_dir(storage, name), explicit, local)
    if prior is None:
        return None
    if not allow_config_change:
        check_config_unchanged(prior, _resolved(cfg))
    if not finished(prior, cfg.run):
        return None
    uri = resolve_tracking_uri(cfg.run.mlflow.get("tracking_uri")) if cfg.run.mlflow.get("enabled", True) else None
    print(f"run '{name}' already finished: its checkpoint {prior.path} completed the schedule "
          f"(run.max_epoch={cfg.run.max_epoch}, max_iters={cfg.run.get('max_iters')}); nothing to train, "
          f"MLflow run {prior.mlflow_run_id} left as it is. Raise run.max_epoch / run.max_iters to train "
          f"further, or give a new run.output_dir for a new run.", flush=True)
    return TrainingResult(metrics=dict(prior.meta.get("metrics") or {}),  # what its last checkpoint reported
                          checkpoint_path=str(prior.path), best_checkpoint_path=None, mlflow_run_id=prior.mlflow_run_id,
                          tracking_uri=uri, storage_path=storage, name=name, finished=True)


def _run_dir(storage: str, name: str) -> Path | None:
    """The Ray run's directory when storage is local (remote storage is not inspected by the driver)."""
    return Path(storage) / name if "://" not in storage else None


def env_hooks() -> tuple[StepHook, ...]:
    """Step hooks named by QFORMER_STEP_HOOKS (`module:factory,...`; each factory is called with no arguments
    and returns a hook): how a test installs one in a job it starts with `ray job submit`."""
    hooks = []
    for spec in filter(None, (s.strip() for s in os.environ.get("QFORMER_STEP_HOOKS", "").split(","))):
        module, _, factory = spec.partition(":")
        hooks.append(getattr(importlib.import_module(module), factory)())
    return tuple(hooks)

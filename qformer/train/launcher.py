"""Launch training on Ray Train V2: datasets, TorchTrainer, storage/name for auto-resume, MLflow run lifecycle.

Resume rules (Train V2 has no Trainer.restore): a run re-launched with the same storage path and name
continues from its latest checkpoint (failure restarts do the same within one fit()). The name is
deterministic (run.ray.name, else derived from output_dir), so re-running a command resumes it. An
explicit `--resume PATH` (or LAVIS's run.resume_ckpt_path) is used only when the Ray run has no
checkpoint of its own. Either way the MLflow run id stored in the checkpoint is reopened, so one
training = one MLflow run.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from qformer import paths
from qformer.logging_setup import get_logger
from qformer.tracking import check_reachable, resolve_tracking_uri
from qformer.train import checkpoint as ckpt_io
from qformer.train import elastic
from qformer.train.checkpoint import check_readable
from qformer.train.errors import RayStartError
from qformer.train.resume import check_config_unchanged, find_prior, finished

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


def connect_ray(cfg: DictConfig) -> None:
    """Attach to run.ray.address / RAY_ADDRESS / the job's cluster, else start a private local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.run.ray.get("address") or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address)
            return
        # dashboard on loopback: users get the Ray UI, and Train's placement-group cleaner its State API
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")  # prints the dashboard URL
    except Exception as err:  # a start-up failure is one line that says what to try, not Ray's traceback
        raise RayStartError(_ray_start_advice(address, err)) from None


def _ray_start_advice(address: str | None, err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    if address:
        return (f"could not connect to the Ray cluster at {address} ({first}); check that it is running and "
                "reachable, or unset run.ray.address / RAY_ADDRESS to start a local Ray")
    return (f"could not start a local Ray ({first}); on a busy machine try again or free some CPUs, attach to "
            f"a running cluster with run.ray.address (or RAY_ADDRESS), and see the Ray logs under "
            f"{os.environ.get('RAY_TMPDIR') or '/tmp'}/ray/session_latest/logs")


def _use_gpu(cfg: DictConfig) -> bool:
    value = cfg.run.ray.get("use_gpu", "auto")
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def start_tracking(cfg: DictConfig, name: str, storage: str, resume_run_id: str | None, parent_run_id: str | None,
                   num_workers: int, use_gpu: bool):
    """Create or reopen this training's MLflow run (driver side). Returns a RunTracker or None when disabled."""
    if not cfg.run.mlflow.get("enabled", True):
        return None
    from qformer.tracking import CONTINUES_TAG, TRAIN_KEY_TAG, RunTracker, flatten_params, git_commit, ui_hint

    uri = resolve_tracking_uri(cfg.run.mlflow.get("tracking_uri"))
    experiment = str(cfg.run.mlflow.experiment_name)
    train_key = f"{storage.rstrip('/')}/{name}"
    run_id = resume_run_id or RunTracker.find_by_train_key(uri, experiment, train_key)
    continues = None
    if run_id and RunTracker.status(uri, run_id) == "FINISHED":  # a finished run is never re-marked: training
        continues, run_id = run_id, None                        # it further opens a new run that points back
        log.info("MLflow: run %s is FINISHED; continuing its training in a new run", continues)
    if run_id:
        tracker = RunTracker.reopen(uri, run_id)
        log.info("MLflow: continuing run %s", run_id)
    else:
        resolved = _resolved(cfg)
        tags = {
            "git_commit": git_commit(), "model_type": f"{cfg.model.arch}/{cfg.model.model_type}",
            "datasets": ",".join(str(d) for d in cfg.datasets), "ray_num_workers": num_workers,
            "ray_use_gpu": use_gpu, "ray_run_name": name, "ray_storage_path": storage, TRAIN_KEY_TAG: train_key,
            **({CONTINUES_TAG: continues} if continues else {}),
        }
        tracker = RunTracker.start(uri, experiment, run_name=cfg.run.mlflow.get("run_name") or name, tags=tags,
                                   params=flatten_params(resolved), config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
                                   parent_run_id=parent_run_id)
    print(f"MLflow: experiment '{experiment}', run {tracker.run_id} at {uri}\n  view: "
          f"{ui_hint(uri, tracker.experiment_id, tracker.run_id)}", flush=True)
    return tracker


def build_trainer(cfg: DictConfig, *, resume: str | None = None, callbacks: Sequence[Any] | None = None,
                  parent_run_id: str | None = None, name: str | None = None, storage: str | None = None,
                  local_mode: bool | None = None, extra_loop_config: dict | None = None, sources=None):
    """The TorchTrainer for `cfg` plus its MLflow tracker: `(trainer, tracker_or_None)`. Ray must be connected.
    `sources`: `qformer.data.pipeline.train_sources(cfg)` when the caller has already read them.

    For sweeps (qformer.tune): call this inside a Tune function trainable with
    `callbacks=[ray.tune.integration.ray_train.TuneReportCallback()]` (constructed inside the trial),
    `parent_run_id=<the sweep's MLflow run>` (the training's run is nested under it) and a deterministic
    `name` per trial (e.g. f"trial-{trial_id}") so a retried trial resumes; then `trainer.fit()` and
    `finish_tracking(tracker, result)`. Reported metrics (rank 0): at checkpoints `epoch`, `step`, `loss`,
    `lr`; at epoch ends `train_epoch/loss*` and `<valid split>/<metric>` (e.g. `val/r_mean`), and at the end
    `<test split>/<metric>`. `local_mode=True` forces Train local mode (num_workers=0, single process).
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from qformer.data.pipeline import build_train_datasets
    from qformer.train.loop import train_loop_per_worker

    name = name or run_name(cfg)
    storage = storage or storage_path(cfg)
    workers = (0, 0) if local_mode else elastic.worker_range(cfg.run.ray.num_workers)
    num_workers = workers[1]  # the fixed size, or the elastic maximum (0: Train local mode)
    use_gpu = _use_gpu(cfg) if num_workers > 0 else False
    for warning in elastic.check(cfg.run):  # errors were raised when the config was validated
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

    # the training loop shows its own progress bar; Ray Data's per-operator bars would interleave with it
    ray.data.DataContext.get_current().enable_progress_bars = False
    from qformer.data.position import create_plan

    plan = create_plan()  # the loop tells the data sources which pass to read, and what of it is done
    if cfg.run.get("vision_cache"):  # cached frozen-ViT features instead of images (qformer cache-features)
        from qformer.features import dataset as cached_train_datasets

        data = cached_train_datasets(cfg, plan=plan)  # ConfigError naming run.vision_cache if the cache doesn't match
    else:
        data = build_train_datasets(cfg, sources, plan=plan)
    tracker = start_tracking(cfg, name, storage, resume_run_id, parent_run_id,
                             num_workers if workers[0] == workers[1] else f"{workers[0]}-{workers[1]}", use_gpu)

    score_key = _score_key(cfg)
    checkpoint_config = ray.train.CheckpointConfig(
        num_to_keep=max(1, int(cfg.run.keep_checkpoints)),
        checkpoint_score_attribute=score_key,
        checkpoint_score_order="max",
    )
    fail_at = os.environ.get("QFORMER_FAIL_ONCE_AT_STEP")
    loop_config = {
        "cfg": _resolved(cfg),
        "mlflow": {"uri": tracker.uri, "run_id": tracker.run_id} if tracker else None,
        "resume_path": resume,
        "ratios": data.ratios,
        "stream_plan": plan,
        "num_rows": dict(data.num_rows),
        "mean": list(data.mean),
        "std": list(data.std),
        "score_key": score_key,
        "local_checkpoint_root": local_root,
        "fail_once_at_step": int(fail_at) if fail_at else None,
        "fail_marker": os.environ.get("QFORMER_FAIL_MARKER") or str(Path(storage) / name / ".injected_failure_done"),
        "workers": [max(1, workers[0]), max(1, workers[1])],  # what the batch plan of each world size is made for
        **(extra_loop_config or {}),
    }
    resources = cfg.run.ray.get("resources_per_worker")
    scaling = ray.train.ScalingConfig(
        num_workers=workers if workers[0] != workers[1] else num_workers, use_gpu=use_gpu,
        resources_per_worker=dict(OmegaConf.to_container(resources)) if resources else None,
        elastic_resize_monitor_interval_s=float(cfg.run.ray.elastic_resize_interval_s),
    )
    if workers[0] != workers[1] and int(cfg.run.ray.max_failures) == 0:
        log.warning("run.ray.num_workers is elastic but run.ray.max_failures is 0: a lost node (or a preemption "
                    "checkpoint) ends the run instead of continuing with fewer workers; set it to -1 or more")
    run_config = ray.train.RunConfig(
        name=name, storage_path=storage, checkpoint_config=checkpoint_config,
        failure_config=ray.train.FailureConfig(max_failures=int(cfg.run.ray.max_failures),
                                               max_preemption_failures=int(cfg.run.ray.max_preemption_failures)),
        callbacks=list(callbacks or []),
    )
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config, datasets=dict(data.datasets))
    return trainer, tracker


def finish_tracking(tracker, result, cfg: DictConfig | None = None) -> None:
    """Close the MLflow run (FINISHED / FAILED) and record where the checkpoints are."""
    if tracker is None:
        return
    deadline = time.monotonic() + (float(cfg.run.mlflow.get("outage_wait_s", 120.0)) if cfg is not None else 0.0)
    while True:
        try:
            _finish(tracker, result, cfg)
            return
        except Exception as err:  # noqa: BLE001 - the training is done; an unreachable server must not undo that
            if time.monotonic() >= deadline:
                log.warning("MLflow: could not close run %s at %s (%s); its status is not recorded", tracker.run_id,
                            tracker.uri, str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
                return
            time.sleep(2.0)


def _finish(tracker, result, cfg: DictConfig | None) -> None:
    error = getattr(result, "error", None) if result is not None else None
    tags: dict[str, str] = {}
    checkpoint = getattr(result, "checkpoint", None) if result is not None else None
    if checkpoint is not None:
        tags["final_checkpoint"] = str(checkpoint.path)
    best = _best_path(result, _score_key(cfg) if cfg is not None else None)
    if best:
        tags["best_checkpoint"] = best
    if tags:
        tracker.set_tags(tags)
    if checkpoint is not None and "://" not in str(checkpoint.path):
        file = Path(str(checkpoint.path)) / ckpt_io.CKPT_FILE
        if file.is_file():  # local storage: keep a copy of the final weights with the run
            tracker.log_artifact(file, "checkpoints/final")
    tracker.end("FAILED" if error is not None else "FINISHED")


def launch_training(cfg: DictConfig, resume: str | None = None, callbacks: Sequence[Any] | None = None,
                    parent_run_id: str | None = None, local_mode: bool | None = None,
                    extra_loop_config: dict | None = None, allow_config_change: bool = False) -> TrainingResult:
    """`qformer train`: check on the driver what can be checked (annotations, image folders, the checkpoint
    a re-launch would continue from), connect Ray, build the TorchTrainer, fit, close the MLflow run.
    Bad input fails before Ray starts (AnnotationError / ConfigError naming file, record or key). A run
    whose checkpoint already completed the schedule is reported finished and left alone (result.finished)."""
    from qformer.data.pipeline import train_sources
    from qformer.data.preflight import check_images

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
                                     local_mode=local_mode, extra_loop_config=extra_loop_config, sources=sources)
    name, storage = trainer.run_config.name, trainer.run_config.storage_path
    print(f"Ray Train run '{name}' in {storage}", flush=True)
    result = None
    try:
        result = trainer.fit()
    except BaseException as err:
        if tracker is not None:
            from qformer.tracking import end_status

            status = end_status(err)  # stopped (Ctrl+C, `ray job stop`): KILLED; broken: FAILED
            try:
                tracker.end(status)
            except Exception as track_err:  # noqa: BLE001 - report the training's error, not the tracker's
                log.warning("MLflow: could not mark run %s %s (%s)", tracker.run_id, status, track_err)
        raise
    finish_tracking(tracker, result, cfg)
    checkpoint = result.checkpoint
    return TrainingResult(
        metrics=dict(result.metrics or {}), checkpoint_path=str(checkpoint.path) if checkpoint else None,
        best_checkpoint_path=_best_path(result, _score_key(cfg)), mlflow_run_id=tracker.run_id if tracker else None,
        tracking_uri=tracker.uri if tracker else None, storage_path=str(storage), name=str(name), error=result.error,
    )


def _check_prior(cfg: DictConfig, resume: str | None, local_mode: bool | None,
                 allow_config_change: bool) -> TrainingResult | None:
    """Before Ray: stop when the checkpoint to continue from has other model/data settings; return the
    finished run's result when there is nothing left to train."""
    name, storage = run_name(cfg), storage_path(cfg)
    local = bool(local_mode) or elastic.worker_range(cfg.run.ray.num_workers)[1] == 0
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
    return TrainingResult(metrics={}, checkpoint_path=str(prior.path), best_checkpoint_path=None,
                          mlflow_run_id=prior.mlflow_run_id, tracking_uri=uri, storage_path=storage, name=name,
                          finished=True)


def _best_path(result, score_key: str | None) -> str | None:
    """The kept checkpoint with the highest validation score (None without validation)."""
    best = getattr(result, "best_checkpoints", None) if result is not None else None
    if not best or not score_key:
        return None
    scored = [(m.get(score_key, float("-inf")), str(c.path)) for c, m in best]
    score, path = max(scored)
    return path if score > float("-inf") else None


def _score_key(cfg: DictConfig) -> str | None:
    valid = list(cfg.run.valid_splits)
    return f"{valid[0]}/{cfg.run.best_metric}" if valid else None


def _run_dir(storage: str, name: str) -> Path | None:
    """The Ray run's directory when storage is local (remote storage is not inspected by the driver)."""
    return Path(storage) / name if "://" not in storage else None

"""The MLflow run of one training, on the driver: created (or reopened on resume) before Ray Train starts,
closed FINISHED / FAILED / KILLED after, with where the checkpoints are."""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qformer.core.logs import get_logger
from qformer.models.checkpoint_io import CKPT_FILE
from qformer.tracking.params import flatten_params, git_commit
from qformer.tracking.run_tracker import CONTINUES_TAG, TRAIN_KEY_TAG, RunTracker
from qformer.tracking.uri import resolve_tracking_uri, ui_hint

log = get_logger("tracking")


def start_tracking(cfg: DictConfig, name: str, storage: str, resume_run_id: str | None, parent_run_id: str | None,
                   num_workers: int, use_gpu: bool):
    """Create or reopen this training's MLflow run (driver side). Returns a RunTracker or None when disabled."""
    if not cfg.run.mlflow.get("enabled", True):
        return None
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
        resolved = OmegaConf.to_container(cfg, resolve=True)
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
    best = best_checkpoint_path(result, score_key(cfg) if cfg is not None else None)
    if best:
        tags["best_checkpoint"] = best
    if tags:
        tracker.set_tags(tags)
    if checkpoint is not None and "://" not in str(checkpoint.path):
        file = Path(str(checkpoint.path)) / CKPT_FILE
        if file.is_file():  # local storage: keep a copy of the final weights with the run
            tracker.log_artifact(file, "checkpoints/final")
    tracker.end("FAILED" if error is not None else "FINISHED")


def score_key(cfg: DictConfig) -> str | None:
    """The metric Ray keeps the best checkpoints by: `<first valid split>/<run.best_metric>`."""
    valid = list(cfg.run.valid_splits)
    return f"{valid[0]}/{cfg.run.best_metric}" if valid else None


def best_checkpoint_path(result, score_key: str | None) -> str | None:
    """The kept checkpoint with the highest validation score (None without validation)."""
    best = getattr(result, "best_checkpoints", None) if result is not None else None
    if not best or not score_key:
        return None
    scored = [(m.get(score_key, float("-inf")), str(c.path)) for c, m in best]
    score, path = max(scored)
    return path if score > float("-inf") else None

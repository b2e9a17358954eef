"""The offline demo: synthetic shapes -> tiny BLIP-2 trained on a local Ray -> retrieval before/after.

Everything is local and offline: the data set is generated, the text model comes from a package, the
MLflow store is a sqlite file under QFORMER_HOME.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from qformer.config import load_config
from qformer.core import paths
from qformer.core.memory import release_freed_memory
from qformer.core.seeding import setup_seeds
from qformer.data.pipeline import build_eval_split
from qformer.data.synth import write_synthetic
from qformer.evaluate.retrieval import evaluate_retrieval
from qformer.evaluate.visuals import ARTIFACT_ROOT, ATTENTION_PNG, GALLERY_PNG
from qformer.jobs.eval_job import evaluate_checkpoint
from qformer.jobs.ray_cluster import connect_ray
from qformer.jobs.train_job import finished_run, launch_training, run_dir
from qformer.models import build_model
from qformer.tracking.run_tracker import RunTracker, artifact_files
from qformer.tracking.uri import mlflow_client, ui_hint
from qformer.train.amp import amp_for_run
from qformer.train.loop_config import UNTRAINED  # MLflow key prefix of the untrained model's evaluation

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "demo" / "tiny_shapes.yaml"
REPORTED = ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean")


def under(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """The metrics named `<prefix>/<name>`, by name."""
    return {k[len(prefix) + 1:]: v for k, v in metrics.items() if k.startswith(f"{prefix}/")}


def ensure_shapes_data(cfg: Any) -> Path:
    """Write the synthetic set where the config's coco_caption annotations point, unless it is there."""
    train_ann = Path(str(cfg.datasets.coco_caption.build_info.annotations.train.storage))
    if not train_ann.is_absolute():
        train_ann = paths.data_root(cfg.run.get("data_root")) / train_ann
    root = train_ann.parent.parent  # <root>/annotations/coco_karpathy_train.json
    if not train_ann.is_file():
        print(f"writing the synthetic shapes data set to {root} ...", flush=True)
        write_synthetic(root)
    return root


def evaluate_untrained(cfg: Any, split: str) -> dict[str, float]:
    """Retrieval of the model exactly as the training worker initialises it (same seed), in this process."""
    setup_seeds(int(cfg.run.seed), 0)
    device = torch.device("cpu")
    amp = amp_for_run(cfg.run, device)  # the precision the loop evaluates in
    model = build_model(cfg.model, vit_fp16_on_cpu=amp.vit_fp16_on_cpu)
    metrics = evaluate_retrieval(model, build_eval_split(cfg, split), k_test=int(cfg.run.k_test),
                                 batch_size=int(cfg.run.batch_size_eval), device=device, autocast_dtype=amp.dtype)
    del model
    release_freed_memory()  # the model and its evaluation's buffers would stay resident through the training
    return metrics


def run_demo(cfg_path: str | None = None, options: list[str] | None = None, fresh: bool = False) -> dict:
    """Train the demo and print retrieval before/after. A re-run of a finished demo prints what its MLflow run
    holds at once (no Ray, nothing evaluated again); `fresh` deletes the finished run's checkpoints first and
    trains again (a new MLflow run)."""
    cfg = load_config(str(cfg_path or DEMO_CONFIG), options)
    data_root = ensure_shapes_data(cfg)
    split = (list(cfg.run.test_splits) or list(cfg.run.valid_splits) or ["test"])[0]
    if fresh:
        _forget_previous_run(cfg)
    else:
        stored = _stored_summary(cfg, split, data_root)
        if stored is not None:
            _print_summary(stored)
            return stored
    print("connecting to Ray ...", flush=True)
    connect_ray(cfg)
    in_run = bool(cfg.run.get("evaluate_untrained")) and split in (list(cfg.run.test_splits)
                                                                  or list(cfg.run.valid_splits))
    if in_run:  # the training loop evaluates its model before the first step: no second model here
        print(f"training; the run first evaluates the untrained model on '{split}' ...", flush=True)
        before = None
    else:
        print(f"evaluating the untrained model on '{split}' ...", flush=True)
        before = evaluate_untrained(cfg, split)
    result = launch_training(cfg)
    after = under(result.metrics, split)
    if not after:  # the split was not evaluated by the loop (e.g. not in run.test_splits): do it here
        after = _evaluate_checkpoint(cfg, result.checkpoint_path, split)
    if before is None:
        before = _logged_untrained(result, split) or evaluate_untrained(cfg, split)
    else:
        _log_untrained(result, split, before)
    summary = {"data": str(data_root), "split": split, "before": before, "after": after,
               "checkpoint": result.checkpoint_path, "mlflow_run_id": result.mlflow_run_id,
               "tracking_uri": result.tracking_uri, **_pictures(result.tracking_uri, result.mlflow_run_id)}
    _print_summary(summary)
    return summary


def _log_untrained(result: Any, split: str, before: dict[str, float]) -> None:
    """The untrained model's numbers into the training's MLflow run (`untrained/<split>/<metric>`, step 0), beside
    the trained ones: the run holds the demo's whole before/after table."""
    if not (result.tracking_uri and result.mlflow_run_id) or result.finished:
        return
    try:
        RunTracker(result.tracking_uri, result.mlflow_run_id).log_metrics(
            {f"{UNTRAINED}/{split}/{k}": float(v) for k, v in before.items()}, step=0)
    except Exception as err:  # the table still prints
        print(f"(could not log the untrained evaluation to MLflow: {err})")


def _logged_untrained(result: Any, split: str) -> dict[str, float]:
    """What the training run logged as its untrained evaluation (run.evaluate_untrained); {} if nothing."""
    if not (result.tracking_uri and result.mlflow_run_id):
        return {}
    return under(mlflow_client(result.tracking_uri).get_run(result.mlflow_run_id).data.metrics, f"{UNTRAINED}/{split}")


def _stored_summary(cfg: Any, split: str, data_root: Path) -> dict | None:
    """A finished demo's summary from its checkpoint and MLflow run, without Ray or any evaluation; None when
    there is something to train or the run does not hold the untrained numbers (an older demo's)."""
    done = finished_run(cfg)
    if done is None or not (done.tracking_uri and done.mlflow_run_id):
        return None
    logged = mlflow_client(done.tracking_uri).get_run(done.mlflow_run_id).data.metrics
    before, after = under(logged, f"{UNTRAINED}/{split}"), under(logged, split)
    if not before or not after:
        return None
    print("(stored results of the finished demo: `qformer demo --fresh` trains it again)", flush=True)
    return {"data": str(data_root), "split": split, "before": before, "after": after,
            "checkpoint": done.checkpoint_path, "mlflow_run_id": done.mlflow_run_id,
            "tracking_uri": done.tracking_uri, "stored": True, **_pictures(done.tracking_uri, done.mlflow_run_id)}


def _forget_previous_run(cfg: Any) -> None:
    """--fresh: remove the demo run's checkpoints so that training starts over (its MLflow run stays)."""
    folder = run_dir(cfg)
    if folder is not None and folder.is_dir():
        print(f"--fresh: removing the previous demo run's checkpoints {folder}", flush=True)
        shutil.rmtree(folder)


def _pictures(uri: str | None, run_id: str | None) -> dict[str, Any]:
    """The run's newest retrieval gallery and attention grid (artifact paths), where its artifacts live on disk,
    and its experiment (for a link straight to the run)."""
    if not (uri and run_id):
        return {}
    try:
        run = mlflow_client(uri).get_run(run_id)
        found = artifact_files(uri, run_id, ARTIFACT_ROOT, ".png")
    except Exception as err:  # the summary still prints
        print(f"(could not list the run's pictures: {err})")
        return {}
    newest = {name: next((p for p in reversed(found) if p.endswith("/" + name)), None)
              for name in (GALLERY_PNG, ATTENTION_PNG)}
    return {"gallery": newest[GALLERY_PNG], "attention": newest[ATTENTION_PNG],
            "artifact_uri": run.info.artifact_uri, "experiment_id": run.info.experiment_id}


def _evaluate_checkpoint(cfg: Any, checkpoint: str | None, split: str) -> dict[str, float]:
    """`split`'s metrics of the checkpoint, in this process, with the AMP policy the training loop's
    evaluation uses (so a re-run of a finished demo prints the numbers its training run logged)."""
    if not checkpoint:
        return evaluate_untrained(cfg, split)
    metrics = evaluate_checkpoint(cfg, checkpoint, [split], track=False, local=True).metrics
    return under(metrics, split)


def _print_summary(s: dict) -> None:
    print("\n=== qformer demo ===")
    print(f"data:        {s['data']}")
    print(f"checkpoint:  {s['checkpoint']}")
    if s["mlflow_run_id"]:
        print(f"MLflow:      run {s['mlflow_run_id']} at {s['tracking_uri']}")
        print(f"             {ui_hint(s['tracking_uri'], s.get('experiment_id'), s['mlflow_run_id'])}")
        for key, what in (("gallery", "retrieval gallery"), ("attention", "query attention")):
            if s.get(key):
                print(f"{key + ':':12s} {s[key]}   ({what}, in the run's Artifacts tab)")
        if str(s.get("artifact_uri", "")).startswith("file://"):
            print(f"artifacts:   {s['artifact_uri'][len('file://'):]}")
    print(f"retrieval on '{s['split']}' (recall %, before -> after training):")
    for key in REPORTED:
        b, a = s["before"].get(key), s["after"].get(key)
        if b is not None and a is not None:
            print(f"  {key:8s} {b:6.2f} -> {a:6.2f}")

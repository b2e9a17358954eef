"""Evaluate a saved checkpoint on a retrieval split, on Ray Train workers or in this process; log to MLflow.

Checkpoints accepted: one of our Ray checkpoint directories (holding checkpoint.pth), a .pth file with
{"model": state_dict, ...} (ours or LAVIS's, e.g. blip2_pretrained.pth), or a bare state dict file.
The model is built from the config first (so the frozen ViT comes from model.vit_weights, as LAVIS),
then the checkpoint is loaded non-strictly and its missing/unexpected keys are reported.

A TorchTrainer of run.ray.num_workers workers runs `evaluate_retrieval` in its process group (images,
texts and the ITM re-rank are split across the workers); `local=True` (`qformer eval --local`) runs it
in this process without Ray.
Autocast follows run.amp / run.amp_dtype exactly as the training loop's evaluation does, so the numbers
equal the ones the training run logged for the same weights. The MLflow run also gets each split's
retrieval gallery and query attention grid (qformer.evaluate.visuals) under visuals/<split>/, rendered
by rank 0 (on Ray, carried back in the checkpoint its report attaches).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from omegaconf import OmegaConf
from ray.train.torch import TorchTrainer

from qformer.config import batch_plan
from qformer.core.logs import setup_logging
from qformer.core.seeding import setup_seeds
from qformer.data.pipeline import build_eval_split
from qformer.data.preflight import check_images
from qformer.data.stats import start_counter
from qformer.evaluate.retrieval import evaluate_retrieval_scores
from qformer.evaluate.visuals import log_visuals, write_visuals
from qformer.jobs.ray_cluster import connect_ray, use_gpu
from qformer.models import build_model
from qformer.tracking.params import flatten_params, git_commit
from qformer.tracking.run_tracker import RunTracker
from qformer.tracking.uri import resolve_tracking_uri
from qformer.train.amp import amp_for_run
from qformer.train.checkpoint import check_readable, load_file

log = logging.getLogger("qformer.evaluate")

VISUALS_DIR = "visuals"  # in the checkpoint an eval worker reports: the pictures of each split


@dataclass
class EvalResult:
    metrics: dict[str, float]  # keys "<split>/<metric>"
    mlflow_run_id: str | None
    tracking_uri: str | None


def load_weights(model: torch.nn.Module, checkpoint: str | Path) -> dict[str, list[str]]:
    """Load our checkpoint (file or Ray checkpoint dir) or a LAVIS checkpoint into `model`, non-strictly."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    state = load_file(path)  # torch.load(weights_only=True); names the file on failure
    report = model.load_checkpoint(state)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing_trainable = [k for k in report["missing"] if k in set(trainable)]
    if len(missing_trainable) == len(trainable):
        raise ValueError(f"checkpoint {checkpoint} matches none of the model's trainable parameters "
                         f"(wrong model.model_type?); unexpected keys e.g. {report['unexpected'][:5]}")
    if missing_trainable:
        log.warning("checkpoint %s lacks %d trainable tensors, e.g. %s", checkpoint, len(missing_trainable),
                    missing_trainable[:5])
    return report


def evaluate_model_on_split(model: torch.nn.Module, cfg: Any, split: str, device: torch.device,
                            rank: int | None = None, world_size: int | None = None,
                            visuals_dir: Path | None = None) -> dict[str, float]:
    """evaluate_retrieval with the config's k_test, batch_size_eval and AMP policy.

    visuals_dir (give it on one rank only): the split's retrieval gallery and attention grid go to
    visuals_dir/<split>/ (qformer.evaluate.visuals); a rendering failure is a warning.
    """
    amp = amp_for_run(cfg.run, device)
    data = build_eval_split(cfg, split)
    metrics, scores = evaluate_retrieval_scores(model, data, k_test=int(cfg.run.k_test),
                                                batch_size=int(cfg.run.batch_size_eval), device=device, rank=rank,
                                                world_size=world_size, autocast_dtype=amp.dtype, label=f"eval {split}")
    if visuals_dir is not None:
        try:
            write_visuals(model, data, scores, Path(visuals_dir) / split, device=device, split_name=split,
                          autocast_dtype=amp.dtype)
        except Exception as err:  # pictures are a view on the evaluation, not part of it
            log.warning("retrieval gallery / attention maps for '%s' not written: %s", split, err)
    return metrics


def _evaluate_here(cfg: Any, checkpoint: str, splits: list[str], device: torch.device,
                   rank: int | None = None, world_size: int | None = None,
                   visuals_dir: Path | None = None) -> dict[str, float]:
    setup_seeds(int(cfg.run.seed), 0)  # same seed on every rank: identical fresh weights where none are loaded
    model = build_model(cfg.model, vit_fp16_on_cpu=amp_for_run(cfg.run, device).vit_fp16_on_cpu)
    load_weights(model, checkpoint)
    model.to(device)
    metrics: dict[str, float] = {}
    for split in splits:
        result = evaluate_model_on_split(model, cfg, split, device, rank, world_size, visuals_dir)
        metrics.update({f"{split}/{k}": float(v) for k, v in result.items()})
    return metrics


def _eval_worker(config: dict) -> None:
    """Ray Train worker: every rank evaluates its share; rank 0's report carries the metrics."""
    rank = ray.train.get_context().get_world_rank()
    setup_logging(rank)  # rank 0's progress lines reach the job log
    cfg = OmegaConf.create(config["cfg"])
    device = ray.train.torch.get_device()
    if rank != 0:
        ray.train.report(_evaluate_here(cfg, config["checkpoint"], config["splits"], device))
        return
    # Train V2's Result.metrics are those of the latest *checkpoint* report, so rank 0 attaches a small one,
    # which also carries the pictures (visuals/<split>/) back to the driver.
    with tempfile.TemporaryDirectory() as tmp:
        visuals = Path(tmp) / VISUALS_DIR if config.get("visuals") else None
        metrics = _evaluate_here(cfg, config["checkpoint"], config["splits"], device, visuals_dir=visuals)
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _evaluate_on_ray(cfg: Any, checkpoint: str, splits: list[str], visuals_dir: Path | None = None
                     ) -> dict[str, float]:
    connect_ray(cfg)
    start_counter()  # the skipped-image counter, owned by this driver: it ends with the job
    resources = cfg.run.ray.get("resources_per_worker")
    scaling = ray.train.ScalingConfig(  # an elastic range: its minimum, the size the cluster can be counted on for
        num_workers=batch_plan.worker_range(cfg.run.ray.num_workers)[0], use_gpu=use_gpu(cfg),
        resources_per_worker=dict(OmegaConf.to_container(resources)) if resources else None,
    )
    with tempfile.TemporaryDirectory(prefix="qformer-eval-") as storage:  # nothing persistent: no checkpoints
        trainer = TorchTrainer(
            _eval_worker,
            train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True),
                               "checkpoint": str(Path(checkpoint).expanduser().resolve()), "splits": splits,
                               "visuals": visuals_dir is not None},
            scaling_config=scaling,
            run_config=ray.train.RunConfig(name="qformer-eval", storage_path=storage),
        )
        result = trainer.fit()
        if visuals_dir is not None and result.error is None and result.checkpoint is not None:
            with result.checkpoint.as_directory() as reported:  # before the temporary storage goes
                if (Path(reported) / VISUALS_DIR).is_dir():
                    shutil.copytree(Path(reported) / VISUALS_DIR, visuals_dir, dirs_exist_ok=True)
    if result.error is not None:
        raise result.error
    if not result.metrics:
        raise RuntimeError("the evaluation workers reported no metrics")
    return {k: float(v) for k, v in result.metrics.items()}


def evaluate_checkpoint(cfg: Any, checkpoint: str | Path, splits: list[str] | None = None,
                        track: bool = True, local: bool = False) -> EvalResult:
    """Metrics "<split>/<name>" of `checkpoint` on `splits` (default run.test_splits, else ["test"]).

    local=True (or run.ray.num_workers == 0) evaluates in this process without Ray.
    """
    splits = list(splits or list(cfg.run.test_splits) or ["test"])
    checkpoint = str(checkpoint)
    check_readable(checkpoint)  # a missing or foreign file, and a wrong image folder, fail here, not in
    check_images(cfg, splits)   # every Ray worker
    tracked = track and cfg.run.mlflow.get("enabled", True)
    with tempfile.TemporaryDirectory(prefix="qformer-eval-visuals-") as tmp:
        visuals = Path(tmp) if tracked else None  # the pictures only go to the MLflow run
        if not local and batch_plan.worker_range(cfg.run.ray.num_workers)[1] > 0:
            metrics = _evaluate_on_ray(cfg, checkpoint, splits, visuals)
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            metrics = _evaluate_here(cfg, checkpoint, splits, device, visuals_dir=visuals)
        run_id = uri = None
        if tracked:
            run_id, uri = _log_to_mlflow(cfg, checkpoint, splits, metrics, visuals)
    return EvalResult(metrics, run_id, uri)


def _log_to_mlflow(cfg: Any, checkpoint: str, splits: list[str], metrics: dict[str, float],
                   visuals_dir: Path | None = None) -> tuple[str, str]:
    """An evaluation is its own MLflow run, in the config's experiment, tagged with what it evaluated;
    with the pictures of each split (visuals_dir/<split>/) under visuals/<split>/."""
    uri = resolve_tracking_uri(cfg.run.mlflow.get("tracking_uri"))
    ckpt = str(Path(checkpoint).expanduser().resolve())
    name = cfg.run.mlflow.get("run_name") or f"eval-{Path(ckpt).name}"
    tracker = RunTracker.start(
        uri, str(cfg.run.mlflow.experiment_name), run_name=str(name),
        tags={"qformer.kind": "eval", "qformer.checkpoint": ckpt, "qformer.splits": ",".join(splits),
              "git_commit": git_commit()},
        params=flatten_params(OmegaConf.to_container(cfg, resolve=True)),
        config_yaml=OmegaConf.to_yaml(cfg),
    )
    skipped = sum(v for k, v in metrics.items() if k.endswith("/skipped_images"))
    try:  # skipped_images: the total over splits, as the training run logs it
        tracker.log_metrics({**metrics, "skipped_images": skipped}, step=0)
    except Exception:
        tracker.end("FAILED")
        raise
    for split in splits:
        if visuals_dir is not None and (visuals_dir / split).is_dir():
            try:
                log_visuals(tracker, visuals_dir / split, split)
            except Exception as err:  # the metrics are logged: pictures missing is a warning
                log.warning("retrieval gallery / attention maps for '%s' not logged: %s", split, err)
    tracker.end("FINISHED")
    return tracker.run_id, uri

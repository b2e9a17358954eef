"""What the launcher hands each training worker: one typed object, built once on the driver.

Ray Train pickles it to every worker (`train_loop_config`), so it holds plain values, a Ray actor handle
and module-level callables only. The experiment config itself (`cfg`) stays the single source of the
run's settings; the fields beside it are what only the driver knows: the MLflow run it opened, the data
it read, the checkpoint to start from, and the callables the loop calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch


UNTRAINED = "untrained"  # MLflow key prefix of run.evaluate_untrained's metrics: untrained/<split>/<metric>


@dataclass(frozen=True)
class TrackingTarget:
    """The MLflow run rank 0 logs into (created or reopened by the driver)."""

    uri: str
    run_id: str


class EvaluateSplit(Protocol):
    """Evaluation handed to the loop (so `train` does not import `evaluate`): retrieval metrics of one split,
    computed by every rank together (a collective); rank 0 may log pictures through `tracker`."""

    def __call__(self, model: torch.nn.Module, cfg: Any, split: str, *, device: torch.device, rank: int,
                 world: int, autocast_dtype: torch.dtype | None, tracker: Any, step: int) -> dict[str, float]: ...


class StepHook(Protocol):
    """Called on every rank after each optimiser step; tests install them (e.g. to inject a failure)."""

    def __call__(self, step: int, rank: int) -> None: ...


@dataclass(frozen=True)
class LoopConfig:
    cfg: dict
    """The resolved experiment config (OmegaConf container): model, datasets, run.*."""
    workers: tuple[int, int] = (1, 1)
    """(min, max) world size the batch plan is made for; a fixed size has min == max; Train local mode (1, 1)."""
    tracking: TrackingTarget | None = None
    """MLflow run for rank 0's metrics, plots and tags; None when tracking is off."""
    resume_path: str | None = None
    """A checkpoint to start from when the Ray run has none of its own (--resume, run.resume_ckpt_path)."""
    ratios: dict[str, float] | None = None
    """run.train_dataset_ratios: one training stream per source, drawn by ratio; None: one stream 'train'."""
    num_rows: dict[str, int] = field(default_factory=dict)
    """Rows per training stream (epoch lengths of mixed streams, and the progress bar's total)."""
    image_mean: tuple[float, ...] | None = None
    """The vis processor's normalisation, applied on the worker's device (None: CLIP's)."""
    image_std: tuple[float, ...] | None = None
    stream_plan: Any = None
    """Ray actor (qformer.data.position) through which the loop tells the data sources which pass to read."""
    score_key: str | None = None
    """`<valid split>/<metric>` Ray keeps the best checkpoints by; step checkpoints report -inf for it."""
    local_checkpoint_root: str | None = None
    """Train local mode persists no checkpoints: they are written here instead."""
    evaluate: EvaluateSplit | None = None
    """Retrieval evaluation of a split; None: valid/test splits are not evaluated."""
    step_hooks: tuple[StepHook, ...] = ()
    """Called after every optimiser step (test fault injection)."""

    @property
    def audit_dir(self) -> str | None:
        """run.data.audit_dir: where each rank records which samples each step trained on."""
        return (self.cfg.get("run", {}).get("data") or {}).get("audit_dir")


def call_hooks(hooks: tuple[Callable[[int, int], None], ...], step: int, rank: int) -> None:
    for hook in hooks:
        hook(step, rank)

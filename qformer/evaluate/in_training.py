"""Evaluation as the training loop calls it (qformer.train.loop_config.EvaluateSplit): the retrieval
metrics of one split, computed by every rank together, and rank 0's pictures (gallery, query attention)
logged into the training's MLflow run. The launcher hands this function to the loop, so training never
imports evaluation."""
from __future__ import annotations

from typing import Any

import torch

from qformer.data.pipeline import build_eval_split
from qformer.evaluate.retrieval import evaluate_retrieval_scores


def evaluate_split(model: torch.nn.Module, cfg: Any, split: str, *, device: torch.device, rank: int, world: int,
                   autocast_dtype: torch.dtype | None, tracker: Any, step: int) -> dict[str, float]:
    data = build_eval_split(cfg, split)
    result, scores = evaluate_retrieval_scores(
        model, data, k_test=int(cfg.run.k_test), batch_size=int(cfg.run.batch_size_eval), device=device, rank=rank,
        world_size=world, autocast_dtype=autocast_dtype, label=f"eval {split} at step {step}")
    if rank == 0 and tracker is not None:  # gallery + attention maps, rank 0 only (no collective)
        # lazy: matplotlib and the model package (~0.7 s) are not needed where this function is only
        # unpickled (Ray Train's controller, before every run and restart)
        from qformer.evaluate.visuals import log_eval_visuals

        log_eval_visuals(tracker, model, data, scores, split, f"step_{step:08d}", device, autocast_dtype)
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}

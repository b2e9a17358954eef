"""The training audit (run.data.audit_dir): which samples each step trained on, on every rank, so that a
user can check that a run trained every sample exactly once across restarts, resizes and preemptions.

Files in the audit directory:
- `rows-rank<r>.jsonl`: one line per micro-batch, `{"step": global step, "ids": [one id per row]}`, appended
  at once so that a failed attempt's rows are kept too (an id is a hash of the row's caption token ids);
- `starts.jsonl`: one line per worker-group start (first start, restart, resize) with the world size and
  the batch plan it trains with;
- `rank<r>.json`, at the end: the rank's batch fingerprints, step counts, LR and a sum per trainable weight
  (equal on every rank when DDP kept them in sync).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from qformer.config.batch_plan import BatchPlan
from qformer.train.checkpoint import ResumePoint
from qformer.train.step import TrainState


class TrainingAudit:
    def __init__(self, directory: str, rank: int, world: int) -> None:
        self.dir, self.rank, self.world = Path(directory), rank, world
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprints: list[str] = []

    def record_start(self, start: ResumePoint, plan: BatchPlan) -> None:
        if self.rank != 0:
            return
        record = {"time": time.time(), "world": self.world, "step": start.step, "epoch": start.epoch,
                  "iter_in_epoch": start.iter_in_epoch, "worker_batch": plan.worker_batch,
                  "micro_per_step": plan.micro_per_step, "accum_grad_iters": plan.accum_grad_iters,
                  "global_batch": plan.global_batch}
        with open(self.dir / "starts.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def record_batch(self, step: int, batch: dict) -> None:
        ids = batch["text_ids"].detach().cpu()
        image = batch["image"].detach().cpu().numpy()
        self.fingerprints.append(f"{int(ids.sum())}-{int(image.astype(np.int64).sum())}")
        rows = [hash(tuple(row)) for row in ids.tolist()]
        with open(self.dir / f"rows-rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "ids": rows}) + "\n")

    def write_summary(self, state: TrainState, model: torch.nn.Module) -> None:
        weights = {k: float(v.float().sum()) for k, v in model.trainable_state_dict().items() if v.is_floating_point()}
        record = {"rank": self.rank, "world": self.world, "global_step": state.global_step,
                  "optimizer_steps": state.optimizer_steps, "lr": state.optimizer.param_groups[0]["lr"],
                  "batches": self.fingerprints, "weights": weights}
        (self.dir / f"rank{self.rank}.json").write_text(json.dumps(record))

"""Checkpoints through Ray Train: every rank reports (a barrier: the same number of times on every rank),
rank 0 with the checkpoint directory. Ray keeps run.keep_checkpoints of them by the validation score; in
Train local mode, which persists nothing, they are written under a local root and pruned here."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import ray.train
import torch
from ray.train import Checkpoint

from qformer.data.stats import LEDGER_KEY, ledger_state
from qformer.train import checkpoint as ckpt_io
from qformer.train.step import TrainState


class CheckpointReporter:
    def __init__(self, rank: int, cfg: dict, model: torch.nn.Module, score_key: str | None,
                 local_root: str | None, keep: int, mlflow_run_id: str | None) -> None:
        self.rank, self.cfg, self.model, self.score_key = rank, cfg, model, score_key
        self.local_root = Path(local_root) if local_root else None
        self.keep, self.mlflow_run_id = keep, mlflow_run_id

    def save(self, state: TrainState, epoch: int, iters: int, epoch_complete: bool, metrics: dict[str, float],
             positions: Callable[[], dict[str, dict]]) -> str | None:
        """Report a checkpoint at (epoch, iters); returns where rank 0's was persisted (None on other ranks).
        `positions` settles the data positions over the ranks (a collective, so every rank calls it)."""
        report = {"epoch": epoch, "step": state.global_step, **metrics}
        if self.score_key and self.score_key not in report:
            report[self.score_key] = float("-inf")  # step checkpoints carry no validation score: kept only while latest
        name = f"epoch={epoch:04d}-step={state.global_step:08d}" + ("-end" if epoch_complete else "")
        settled = positions()
        if self.rank != 0:
            ray.train.report(report, checkpoint=None)
            return None
        settled[LEDGER_KEY] = _ledger()  # the run's lost samples so far, so a resume counts on from them
        saved = ckpt_io.build_state(self.model, state.optimizer, state.scheduler, state.scaler, self.cfg, epoch=epoch,
                                    step=state.global_step, iters_in_epoch=iters, epoch_complete=epoch_complete,
                                    mlflow_run_id=self.mlflow_run_id, data_position=settled, metrics=report)
        if self.local_root is not None:
            target = ckpt_io.save_dir(saved, self.local_root / name)
            ray.train.report(report, checkpoint=Checkpoint.from_directory(str(target)))
            prune_local(self.local_root, self.keep)
            return str(target)
        with tempfile.TemporaryDirectory(prefix="qformer-ckpt-") as tmp:
            ckpt_io.save_dir(saved, tmp)
            ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        return _persisted_path(name)

    @staticmethod
    def report(metrics: dict[str, Any]) -> None:
        """Metrics without a checkpoint (every rank)."""
        ray.train.report(metrics)


def _ledger() -> dict:
    try:
        return ledger_state()
    except Exception:  # noqa: BLE001 - a count must not cost the checkpoint
        return {}


def _persisted_path(name: str) -> str:
    try:
        storage = ray.train.get_context().get_storage()
        return f"{storage.experiment_fs_path.rstrip('/')}/{name}"
    except Exception:
        return name


def prune_local(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoint directories under `root` (by step); 0 keeps all."""
    if keep <= 0:
        return
    dirs = sorted((d for d in root.iterdir() if (d / ckpt_io.META_FILE).is_file()),
                  key=lambda d: json.loads((d / ckpt_io.META_FILE).read_text()).get("step", 0))
    for old in dirs[: max(0, len(dirs) - keep)]:
        shutil.rmtree(old, ignore_errors=True)

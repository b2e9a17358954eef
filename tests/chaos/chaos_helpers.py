"""Shared pieces of the chaos tests: the small config, MLflow reads, waiting, the report row."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from helpers import merged, tiny_config, tiny_run


@dataclass
class ChaosRow:
    fault: str
    promise: str
    steps_lost: int | None
    steps_repeated: int | None
    mlflow_runs: int | None
    recover_s: float | None


def chaos_cfg(bert: Path, shapes: Path, tmp_path: Path, name: str, run: dict, options: list[str] | None = None):
    """The tiny model on the shapes set, 16 images x 2 captions, batch 4: 8 steps per epoch, a checkpoint
    every 2 steps."""
    from qformer.data.synth import coco_caption_section

    base = tiny_run(tmp_path, name, save_freq_steps=2, keep_checkpoints=5, mlflow={"experiment_name": "chaos"})
    return tiny_config(bert, coco_caption_section(shapes), merged(base, run), options=options)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def loss_steps(uri: str, run_id: str) -> list[int]:
    """The steps of the run's `loss` history, with repeats (a step logged twice appears twice)."""
    return sorted(m.step for m in client_for(uri).get_metric_history(run_id, "loss"))


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def latest_run_id(uri: str, experiment: str = "chaos") -> str | None:
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def uninterrupted_lrs(cfg, steps: int) -> dict[int, float]:
    """The LR at each global step of an uninterrupted run: the scheduler stepped as the loop steps it."""
    import torch

    from qformer.train.lr_schedule import build_lr_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=float(cfg.run.init_lr))
    sched = build_lr_scheduler(opt, cfg.run)
    per_epoch = int(cfg.run.get("max_steps_per_epoch") or 8)
    lrs = {}
    for step in range(1, steps + 1):
        sched.step((step - 1) // per_epoch, (step - 1) % per_epoch)
        lrs[step] = opt.param_groups[0]["lr"]
    return lrs

"""Training checkpoints: LAVIS's file layout inside a Ray Train checkpoint directory.

`checkpoint.pth` holds LAVIS's keys {"model", "optimizer", "config", "scaler", "epoch"} so LAVIS tools
can read it, plus ours: "scheduler" (position), "step" (global micro-batches done), "iters" (the same,
runner_iter's key), "iters_in_epoch" (micro-batches done in `epoch`), "epoch_complete" and
"mlflow_run_id". "model" is the trainable state dict (the frozen ViT is not re-saved, like LAVIS).
`meta.json` beside it repeats the small fields, and the config's model and datasets sections, so the
driver can read them without loading tensors.

Everything in the file is tensors and plain Python values, so loading uses torch.load(weights_only=True).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CKPT_FILE = "checkpoint.pth"
META_FILE = "meta.json"
META_KEYS = ("epoch", "step", "iters_in_epoch", "epoch_complete", "mlflow_run_id")
CONFIG_SECTIONS = ("model", "datasets")


@dataclass(frozen=True)
class ResumePoint:
    """Where training continues: (inner) epoch, the in-epoch micro-batch index, the global step."""

    epoch: int
    iter_in_epoch: int
    step: int

    @classmethod
    def from_state(cls, state: dict) -> "ResumePoint":
        epoch, step = int(state.get("epoch", 0)), int(state.get("step", state.get("iters", 0)) or 0)
        if state.get("epoch_complete", True):  # LAVIS checkpoints are written at epoch end: start_epoch = epoch + 1
            return cls(epoch + 1, 0, step)
        return cls(epoch, int(state.get("iters_in_epoch", 0)), step)


def build_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: torch.amp.GradScaler | None, config: dict, *, epoch: int, step: int, iters_in_epoch: int,
                epoch_complete: bool, mlflow_run_id: str | None) -> dict:
    trainable = getattr(model, "checkpoint_state_dict", None)
    model_state = trainable() if callable(trainable) else {
        k: v for k, v in model.state_dict().items() if k not in _frozen_param_names(model)}
    return {
        "model": model_state,
        "optimizer": optimizer.state_dict(),
        "config": config,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "iters": int(step),
        "iters_in_epoch": int(iters_in_epoch),
        "epoch_complete": bool(epoch_complete),
        "mlflow_run_id": mlflow_run_id,
    }


def _frozen_param_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def save_dir(state: dict, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / CKPT_FILE)
    meta = {k: state.get(k) for k in META_KEYS}
    config = state.get("config") or {}
    meta["config"] = {k: config.get(k) for k in CONFIG_SECTIONS}  # what a resume must not silently change
    (directory / META_FILE).write_text(json.dumps(meta))
    return directory


def resolve_file(path: str | Path) -> Path:
    """A checkpoint file, or a directory holding checkpoint.pth (ours) or exactly one *.pth (LAVIS's)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / CKPT_FILE).is_file():
            return path / CKPT_FILE
        candidates = sorted(path.glob("*.pth"))
        if len(candidates) == 1:
            return candidates[0]
        raise FileNotFoundError(f"checkpoint directory {path} has no {CKPT_FILE} and {len(candidates)} *.pth files")
    raise FileNotFoundError(f"checkpoint {path} does not exist")


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    file = resolve_file(path)
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle with arbitrary objects: refuse rather than execute it
        raise ValueError(f"checkpoint {file} cannot be loaded with torch.load(weights_only=True): {err}") from err
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"checkpoint {file} is not a training checkpoint (no 'model' key)")
    return state


def read_meta(directory: str | Path) -> dict:
    """The small fields of a checkpoint directory (meta.json, else the .pth itself)."""
    directory = Path(directory)
    meta = directory / META_FILE
    if meta.is_file():
        return json.loads(meta.read_text())
    state = load_file(directory)
    meta = {k: state.get(k) for k in META_KEYS}
    config = state.get("config")
    if "step" in state and isinstance(config, dict):  # ours: its config has our layout (LAVIS's does not)
        meta["config"] = {k: config.get(k) for k in CONFIG_SECTIONS}
    return meta

"""Training checkpoints: LAVIS's file layout inside a Ray Train checkpoint directory.

`checkpoint.pth` holds LAVIS's keys {"model", "optimizer", "config", "scaler", "epoch"} so LAVIS tools
can read it, plus ours: "scheduler" (position), "step" (global micro-batches done), "iters" (the same,
runner_iter's key), "iters_in_epoch" (micro-batches done in `epoch`), "epoch_complete",
"mlflow_run_id" and "data_position" (per training stream: its pass and the read units done). "model" is the trainable state dict (the frozen ViT is not re-saved, like LAVIS).
`meta.json` beside it repeats the small fields, and the config's model and datasets sections, so the
driver can read them without loading tensors.

Everything in the file is tensors and plain Python values, so loading uses torch.load(weights_only=True).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qformer.core.errors import CheckpointError
from qformer.models.checkpoint_io import CKPT_FILE, resolve_file, torch_load

META_FILE = "meta.json"
META_KEYS = ("epoch", "step", "iters_in_epoch", "epoch_complete", "mlflow_run_id", "metrics")
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
                epoch_complete: bool, mlflow_run_id: str | None, data_position: dict | None = None,
                metrics: dict | None = None) -> dict:
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
        "data_position": data_position or {},  # per stream: qformer.data.position.StreamPosition.to_dict()
        "metrics": dict(metrics or {}),  # what was reported with it (a finished run reports them again)
    }


def _frozen_param_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, permissions); nothing partial was left behind."""


def save_dir(state: dict, directory: str | Path) -> Path:
    """Write checkpoint.pth + meta.json into `directory`, atomically: both go into a hidden sibling
    first, which is renamed into place only when complete, so a crash or a full disk never leaves a
    newest checkpoint that a resume would pick half written. meta.json records the .pth's size."""
    directory = Path(directory)
    partial = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        torch.save(state, partial / CKPT_FILE)
        meta = {k: state.get(k) for k in META_KEYS}
        config = state.get("config") or {}
        meta["config"] = {k: config.get(k) for k in CONFIG_SECTIONS}  # what a resume must not silently change
        meta["ckpt_bytes"] = (partial / CKPT_FILE).stat().st_size
        (partial / META_FILE).write_text(json.dumps(meta))
        if directory.exists():  # an (empty) temporary directory handed in by the caller, or a stale one
            shutil.rmtree(directory)
        os.replace(partial, directory)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointWriteError(f"could not write checkpoint {directory}: {_write_cause(err, directory)}; "
                                   "nothing partial was kept, the previous checkpoint is intact") from err
    return directory


def _write_cause(err: BaseException, directory: Path) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    try:
        free = shutil.disk_usage(directory.parent).free
    except OSError:
        return text
    full = getattr(err, "errno", None) == errno.ENOSPC or "write failed" in text or free < 1024**2
    return f"no space left on the device ({free / 1024**2:.1f} MiB free; {text})" if full else text


def incomplete(directory: str | Path) -> str | None:
    """Why a checkpoint directory cannot be resumed from (no meta, no file, wrong size), or None."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError) as err:
        return f"unreadable {META_FILE} ({err})"
    file = directory / CKPT_FILE
    if not file.is_file():
        return f"no {CKPT_FILE}"
    expected, actual = meta.get("ckpt_bytes"), file.stat().st_size
    if expected is not None and actual != expected:
        return f"{CKPT_FILE} has {actual} bytes, {expected} were written (truncated or partly copied)"
    return None


def check_readable(path: str | Path) -> Path:
    """On the driver, before anything heavy starts: `path` exists and holds a torch state dict (ours,
    LAVIS's {"model": ...} or a bare one). Memory-mapped, so a large file is not read. CheckpointError
    names the file otherwise."""
    try:
        file = resolve_file(path)
    except FileNotFoundError as err:
        raise CheckpointError(str(err)) from None
    try:
        state = torch_load(file, "cpu", mmap=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {file} cannot be read as a torch checkpoint: {first[:200]}") from None
    tensors = isinstance(state, dict) and any(isinstance(v, torch.Tensor) for v in state.values())
    if not isinstance(state, dict) or not (isinstance(state.get("model"), dict) or tensors):
        raise CheckpointError(f"checkpoint {file} holds a {type(state).__name__} with no 'model' state dict; "
                              "expected a training checkpoint or a state dict")
    return file


def load_file(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    file = resolve_file(path)
    try:
        state = torch_load(file, map_location, mmap)
    except Exception as err:  # pickle with arbitrary objects: refuse rather than execute it
        raise ValueError(f"checkpoint {file} cannot be loaded with torch.load(weights_only=True): {err}") from err
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"checkpoint {file} is not a training checkpoint (no 'model' key)")
    return state


def read_meta(directory: str | Path) -> dict:
    """The small fields of a checkpoint directory (meta.json), else of the checkpoint file it holds or
    that `directory` names (memory-mapped: the tensors are not read)."""
    directory = Path(directory)
    meta = directory / META_FILE
    if meta.is_file():
        return json.loads(meta.read_text())
    state = load_file(directory, mmap=True)
    meta = {k: state.get(k) for k in META_KEYS}
    config = state.get("config")
    if "step" in state and isinstance(config, dict):  # ours: its config has our layout (LAVIS's does not)
        meta["config"] = {k: config.get(k) for k in CONFIG_SECTIONS}
    return meta

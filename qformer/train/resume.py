"""What a training launch continues from, decided on the driver before Ray starts.

Same rules as the worker's restore (qformer.train.loop._restore_state): on Ray Train workers the run's
latest checkpoint in `<storage>/<name>/` wins over an explicit `--resume` file; in Train's local mode
(which persists nothing itself) the explicit file wins over the latest of `local_checkpoints/`. An
incomplete newest checkpoint (truncated, half copied) is passed over, with a warning, for the one before.

Re-running a command must not silently change a run: a checkpoint written with other `model`/`datasets`
settings stops the launch with the differing keys (unless the caller allows it), and a checkpoint that
already completed the configured schedule is reported as finished instead of being trained (or its
test evaluation re-run) again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qformer.core.errors import ConfigError
from qformer.train import checkpoint as ckpt_io
from qformer.train.lr_schedule import schedule_max_epoch

log = logging.getLogger("qformer.train")
SHOWN_KEYS = 8  # differing keys listed in the error; the rest are counted


@dataclass(frozen=True)
class PriorCheckpoint:
    """The checkpoint a launch would continue from."""

    path: Path  # checkpoint directory, or an explicit file (LAVIS .pth)
    meta: dict  # ckpt_io.read_meta: epoch, step, ..., mlflow_run_id, config (ours only)
    passed_over: tuple[str, ...] = ()  # newer checkpoint directories that are incomplete (names)

    @property
    def mlflow_run_id(self) -> str | None:
        return self.meta.get("mlflow_run_id")


def latest_checkpoint_dir(root: Path | None) -> tuple[Path | None, list[str]]:
    """(the complete directory under `root`, one level, with the highest step; the names of newer
    directories passed over because they are incomplete). A truncated or half-copied newest checkpoint
    (ckpt_io.incomplete) is passed over with a warning: the previous good one is the resume point."""
    if root is None or not root.is_dir():
        return None, []
    found = []
    for meta in root.glob(f"*/{ckpt_io.META_FILE}"):
        try:
            found.append((int(ckpt_io.read_meta(meta.parent).get("step") or 0), meta.parent.name))
        except (OSError, ValueError):  # an unreadable meta.json is not a resume point
            continue
    passed: list[str] = []
    for _, name in sorted(found, reverse=True):
        reason = ckpt_io.incomplete(root / name)
        if reason is None:
            return root / name, passed
        log.warning("checkpoint %s is incomplete (%s): passing over it to the previous one", root / name, reason)
        passed.append(name)
    return None, passed


def find_prior(run_dir: Path | None, explicit: str | None, local_mode: bool) -> PriorCheckpoint | None:
    """The checkpoint this launch continues from, or None for a fresh start."""
    passed: list[str] = []
    if local_mode:
        latest, passed = latest_checkpoint_dir(run_dir / "local_checkpoints" if run_dir else None)
        path = Path(explicit).expanduser() if explicit else latest
    else:
        latest, passed = latest_checkpoint_dir(run_dir)
        path = latest or (Path(explicit).expanduser() if explicit else None)
    if path is None:
        return None
    file = ckpt_io.resolve_file(path)
    where = file.parent if file.name == ckpt_io.CKPT_FILE else file  # ours is a directory; LAVIS's a file
    return PriorCheckpoint(where, ckpt_io.read_meta(where), tuple(passed))


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (a key present on one side only too)."""
    keys = []
    for key in sorted(set(saved) | set(current), key=str):
        path = f"{prefix}.{key}" if prefix else str(key)
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(config_differences(a, b, path))
        elif a != b:
            keys.append(f"{path} ({_short(a)} -> {_short(b)})")
    return keys


def _short(value: Any) -> str:
    text = "unset" if value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_config_unchanged(prior: PriorCheckpoint, cfg: dict) -> None:
    """ConfigError listing the model/datasets keys `cfg` changed since `prior` was written."""
    saved = prior.meta.get("config")
    if not isinstance(saved, dict):  # a LAVIS checkpoint, or one written before configs were recorded
        return
    diffs = config_differences({k: saved.get(k) or {} for k in ckpt_io.CONFIG_SECTIONS},
                               {k: cfg.get(k) or {} for k in ckpt_io.CONFIG_SECTIONS})
    if diffs:
        more = f" and {len(diffs) - SHOWN_KEYS} more" if len(diffs) > SHOWN_KEYS else ""
        raise ConfigError(
            f"the checkpoint this run continues from ({prior.path}) was written with other settings: "
            f"{'; '.join(diffs[:SHOWN_KEYS])}{more}. Give a new run.output_dir (or run.ray.name) for a new "
            f"run, or pass --allow-config-change to continue it anyway")


def finished(prior: PriorCheckpoint, run_cfg: Any) -> bool:
    """True when `prior` already completed the schedule `run_cfg` configures (nothing left to train)."""
    point = ckpt_io.ResumePoint.from_state(prior.meta)
    # the loop's own rule (loop._Runner.run): the first (inner) epoch left to run is past the schedule
    first = point.step // int(run_cfg.iters_per_inner_epoch) if run_cfg.get("max_iters") else point.epoch
    return first >= schedule_max_epoch(run_cfg)

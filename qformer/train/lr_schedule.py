"""LAVIS's learning-rate schedules (spec §5.2) as torch LR schedulers.

LAVIS steps its scheduler with an explicit position, `step(cur_epoch, cur_step)`, BEFORE the forward of
every micro-batch (not per optimiser step). Warm-up happens only inside epoch 0 and is indexed by the
in-epoch step; from epoch 1 on the LR is constant within an epoch (per-epoch cosine / step decay).
The iteration-based runner (§5.3) uses the same schedulers with (inner_epoch, step-in-inner-epoch) and
`max_epoch = int(max_iters / iters_per_inner_epoch)`.

The position (cur_epoch, cur_step) lives on the scheduler, so `state_dict()` round-trips it; the LR itself
is always recomputed from the position (LAVIS saves no scheduler state and recomputes it the same way).
Every param group gets the same LR: LAVIS ignores the groups' `lr_scale`.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from qformer.core.errors import ConfigError

SCHEDULE_NAMES = ("linear_warmup_cosine_lr", "linear_warmup_step_lr", "constant_lr")


def warmup_lr(step: int, warmup_steps: int, warmup_start_lr: float, init_lr: float) -> float:
    """LAVIS `warmup_lr_schedule`: linear from warmup_start_lr, capped at init_lr (stays there after warm-up)."""
    return min(init_lr, warmup_start_lr + (init_lr - warmup_start_lr) * step / max(warmup_steps, 1))


def cosine_lr(epoch: int, max_epoch: int, init_lr: float, min_lr: float) -> float:
    """LAVIS `cosine_lr_schedule`: per-epoch cosine; min_lr is only approached, never reached."""
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


def step_decay_lr(epoch: int, init_lr: float, min_lr: float, decay_rate: float) -> float:
    """LAVIS `step_lr_schedule`."""
    return max(min_lr, init_lr * decay_rate**epoch)


class LavisLRScheduler(LRScheduler):
    """Base: the LR is a pure function of (cur_epoch, cur_step); subclasses implement `lr_at`.

    Call `step(cur_epoch, cur_step)` before each micro-batch's forward, as LAVIS does. `last_epoch`
    keeps torch's meaning here: the number of scheduler steps taken.
    """

    def __init__(self, optimizer: Optimizer, init_lr: float, warmup_start_lr: float = -1, warmup_steps: int = 0):
        self.init_lr = float(init_lr)
        # LAVIS: warmup_lr < 0 means "warm up from init_lr", i.e. no warm-up at all.
        self.warmup_start_lr = float(warmup_start_lr) if warmup_start_lr is not None and warmup_start_lr >= 0 else self.init_lr
        self.warmup_steps = int(warmup_steps or 0)
        self.cur_epoch = 0
        self.cur_step = 0
        # elastic per_worker_batch mode scales the whole schedule with the world size (set after a
        # load_state_dict: the factor belongs to the current world, not the checkpoint's)
        self.lr_scale = 1.0
        super().__init__(optimizer)

    def lr_at(self, epoch: int, step: int) -> float:
        raise NotImplementedError

    def _epoch0_lr(self, step: int) -> float:
        return warmup_lr(step, self.warmup_steps, self.warmup_start_lr, self.init_lr)

    def get_lr(self) -> list[float]:
        lr = self.lr_at(self.cur_epoch, self.cur_step) * self.lr_scale
        return [lr for _ in self.optimizer.param_groups]

    def step(self, cur_epoch: int | None = None, cur_step: int | None = None) -> None:  # type: ignore[override]
        """Move to (cur_epoch, cur_step) and set every group's LR; no arguments = re-apply the current position."""
        if cur_epoch is not None:
            self.cur_epoch = int(cur_epoch)
            self.cur_step = int(cur_step or 0)
        # LAVIS's order (scheduler before the optimiser) is deliberate; silence torch's order warning.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
            super().step()

    @property
    def position(self) -> tuple[int, int]:
        return self.cur_epoch, self.cur_step


class LinearWarmupCosineLR(LavisLRScheduler):
    """`linear_warmup_cosine_lr`: warm-up in epoch 0, then per-epoch cosine from init_lr towards min_lr."""

    def __init__(self, optimizer: Optimizer, max_epoch: int, min_lr: float, init_lr: float,
                 warmup_start_lr: float = -1, warmup_steps: int = 0):
        self.max_epoch = int(max_epoch)
        self.min_lr = float(min_lr)
        super().__init__(optimizer, init_lr, warmup_start_lr, warmup_steps)

    def lr_at(self, epoch: int, step: int) -> float:
        if epoch == 0:
            return self._epoch0_lr(step)
        return cosine_lr(epoch, self.max_epoch, self.init_lr, self.min_lr)


class LinearWarmupStepLR(LavisLRScheduler):
    """`linear_warmup_step_lr`: warm-up in epoch 0, then max(min_lr, init_lr * decay_rate^epoch)."""

    def __init__(self, optimizer: Optimizer, min_lr: float, init_lr: float, decay_rate: float = 1.0,
                 warmup_start_lr: float = -1, warmup_steps: int = 0):
        self.min_lr = float(min_lr)
        self.decay_rate = float(decay_rate)
        super().__init__(optimizer, init_lr, warmup_start_lr, warmup_steps)

    def lr_at(self, epoch: int, step: int) -> float:
        if epoch == 0:
            return self._epoch0_lr(step)
        return step_decay_lr(epoch, self.init_lr, self.min_lr, self.decay_rate)


class WarmupConstantLR(LavisLRScheduler):
    """`constant_lr`: warm-up in epoch 0, then init_lr forever."""

    def lr_at(self, epoch: int, step: int) -> float:
        return self._epoch0_lr(step) if epoch == 0 else self.init_lr


def schedule_max_epoch(run_cfg: Any) -> int:
    """The cosine horizon: run.max_epoch, or int(max_iters / iters_per_inner_epoch) for runner_iter (§5.3)."""
    if run_cfg.get("max_iters"):
        per = run_cfg.get("iters_per_inner_epoch")
        if not per:
            raise _config_error("run.iters_per_inner_epoch", "is required when run.max_iters is set (iteration-based runner)")
        return int(int(run_cfg.max_iters) / int(per))
    return int(run_cfg.max_epoch)


def build_lr_scheduler(optimizer: Optimizer, run_cfg: Any) -> LavisLRScheduler:
    """The scheduler named by run.lr_sched, built with LAVIS RunnerBase's arguments."""
    name = run_cfg.get("lr_sched", "linear_warmup_cosine_lr")
    init_lr = float(run_cfg.init_lr)
    min_lr = float(run_cfg.get("min_lr", 0.0) or 0.0)
    warmup_start = run_cfg.get("warmup_lr", -1)
    warmup_start = -1 if warmup_start is None else float(warmup_start)
    warmup_steps = int(run_cfg.get("warmup_steps", 0) or 0)
    if name == "linear_warmup_cosine_lr":
        return LinearWarmupCosineLR(optimizer, schedule_max_epoch(run_cfg), min_lr, init_lr, warmup_start, warmup_steps)
    if name == "linear_warmup_step_lr":
        decay = run_cfg.get("lr_decay_rate")
        if decay is None:
            # LAVIS passes None through and crashes at epoch 1; fail before training instead.
            raise _config_error("run.lr_decay_rate", "must be set for run.lr_sched=linear_warmup_step_lr")
        return LinearWarmupStepLR(optimizer, min_lr, init_lr, float(decay), warmup_start, warmup_steps)
    if name == "constant_lr":
        return WarmupConstantLR(optimizer, init_lr, warmup_start, warmup_steps)
    raise _config_error("run.lr_sched", f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")


def _config_error(key: str, message: str) -> Exception:
    return ConfigError(message, key=key)

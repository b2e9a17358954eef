"""One training micro-batch, LAVIS's `_train_inner_loop` body (spec §5.1), callable without Ray.

Order per micro-batch i (in-epoch index): scheduler.step(epoch, i) BEFORE the forward; forward under
autocast; backward of loss / accum_grad_iters; every accum_grad_iters micro-batches an optimiser (or
GradScaler) step and zero_grad. No gradient clipping (LAVIS has none); the grad norm is computed on log
steps only, for logging. Nothing here calls `.item()` unless asked to log (or in skip_nonfinite mode, which
must decide on the host whether to step, one flag per optimiser step, like GradScaler itself).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.distributed as dist

from qformer.data.normalize import normalize_uint8
from qformer.train.amp import AmpPolicy

LOSS_KEYS = ("loss", "loss_itc", "loss_itm", "loss_lm")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and run.skip_nonfinite is false."""


@dataclass
class TrainState:
    """Everything one worker's step mutates. `model` may be DDP-wrapped."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # qformer.train.lr_schedule.LavisLRScheduler
    amp: AmpPolicy
    device: torch.device
    scaler: torch.amp.GradScaler | None = None
    accum_grad_iters: int = 1
    skip_nonfinite: bool = False
    global_step: int = 0  # micro-batches done over the whole run (LAVIS "iters")
    skipped_nonfinite: int = 0  # optimiser steps skipped for a non-finite loss (skip mode)
    # error mode: device-side "a non-finite loss was seen since the last check" flag, checked lazily
    image_mean: tuple[float, ...] | None = None  # the vis processor's normalisation (None: CLIP's)
    image_std: tuple[float, ...] | None = None
    # micro-batches per step (qformer.config.batch_plan: a smaller world keeps the global batch by running
    # several micro-batches per step); the step count and the LR schedule advance once per step
    micro_per_step: int = 1
    _bad_flag: torch.Tensor | None = field(default=None, repr=False)
    _last_checked_step: int = 0
    _optimizer_calls: int = field(default=0, repr=False)
    _skipped_by_scaler: int = field(default=0, repr=False)  # overflows the scaler skipped on the host (no call)
    _skipped_by_kernel: int = field(default=0, repr=False)  # overflows a fused kernel skipped (called), read back
    _skipped_on_device: torch.Tensor | None = field(default=None, repr=False)  # fused kernel's skips, not read yet

    def __post_init__(self) -> None:
        if self.accum_grad_iters < 1:
            raise ValueError(f"run.accum_grad_iters must be >= 1, got {self.accum_grad_iters}")

        def count_call(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            self._optimizer_calls += 1
            # A fused AdamW (`_step_supports_amp_scaling`) is always called by GradScaler.step, with the
            # scaler's device-side overflow flag as `found_inf`; the kernel then leaves the weights and its
            # step counters alone. The flag is summed on the device and read only when a count is asked for.
            found_inf = getattr(optimizer, "found_inf", None)
            if found_inf is not None:
                found = found_inf.detach().to(torch.int64)
                self._skipped_on_device = found if self._skipped_on_device is None else self._skipped_on_device + found

        # GradScaler.step skips a non-fused optimizer.step() on an overflow without saying so; counting the calls
        # that did happen tells the two apart with no read from the device (the scaler has already synced for it)
        self.optimizer.register_step_post_hook(count_call)

    def _settle(self) -> None:
        if self._skipped_on_device is not None:  # one read from the device, only when a count is read
            self._skipped_by_kernel += int(self._skipped_on_device.sum())
            self._skipped_on_device = None

    @property
    def optimizer_steps(self) -> int:
        """Optimiser steps that changed the weights."""
        self._settle()
        return self._optimizer_calls - self._skipped_by_kernel

    @property
    def skipped_overflow(self) -> int:
        """fp16: optimiser steps skipped for inf/NaN gradients (the GradScaler halves its scale for each)."""
        self._settle()
        return self._skipped_by_scaler + self._skipped_by_kernel

    @property
    def unwrapped(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]  # detached, NOT divided by accum_grad_iters
    lr: float
    # False for a skipped step (non-finite loss in skip mode; an fp16 overflow with a non-fused kernel). A fused
    # kernel's overflow skip is known on the device only: TrainState.skipped_overflow counts it when read.
    optimizer_stepped: bool
    grad_norm: float | None = None  # only on log steps


def prepare_samples(batch: Mapping[str, Any], device: torch.device, mean: tuple[float, ...] | None = None,
                    std: tuple[float, ...] | None = None) -> dict[str, Any]:
    """Move a batch to the device and CLIP-normalise uint8 images there (cheaper than on the CPU workers)."""
    samples: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
        samples[key] = value
    image = samples.get("image")
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
        kwargs = {"mean": mean, "std": std} if mean is not None and std is not None else {}
        samples["image"] = normalize_uint8(image, **kwargs)
    return samples


def with_text_plan(batch: Mapping[str, Any], model: torch.nn.Module) -> Mapping[str, Any]:
    """Add the model's host-side text plan (Blip2Qformer.text_plan) while the token batch is still on
    the CPU, so that the forward needs no device->host reads to trim padding or pick LM targets."""
    ids, atts = batch.get("text_ids"), batch.get("text_atts")
    plan = getattr(model, "text_plan", None)
    if plan is None or not isinstance(ids, torch.Tensor) or not isinstance(atts, torch.Tensor) or ids.device.type != "cpu":
        return batch
    return {**batch, **plan(ids, atts)}


def _loss_dict(output: Any) -> dict[str, torch.Tensor]:
    """Every output field whose name contains "loss" (LAVIS BaseTask.train_step)."""
    if dataclasses.is_dataclass(output):
        items = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    elif isinstance(output, Mapping):
        items = dict(output)
    else:
        items = {"loss": output}
    losses = {k: v for k, v in items.items() if "loss" in k and isinstance(v, torch.Tensor)}
    if "loss" not in losses:
        raise TypeError(f"model output has no tensor 'loss' field (got {sorted(items)})")
    return losses


def _grad_norm(state: TrainState) -> float:
    grads = [p.grad for p in state.unwrapped.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    scale = state.scaler.get_scale() if state.scaler is not None and state.scaler.is_enabled() else 1.0
    return float(norm) / float(scale)


def _any_rank(flag: torch.Tensor) -> bool:
    """True if the flag is set on any rank, so every rank takes the same branch (DDP needs that)."""
    flag = flag.to(torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def check_finite(state: TrainState) -> None:
    """Raise NonFiniteLossError if any rank saw a non-finite loss since the last check (error mode).

    Called on log steps and before every checkpoint, so the last checkpoint written is always a good one.
    All ranks must call it at the same steps (it is a collective when a process group exists).
    """
    if state.skip_nonfinite or state._bad_flag is None:
        return
    bad = _any_rank(state._bad_flag)
    first, last = state._last_checked_step + 1, state.global_step
    state._bad_flag = None
    state._last_checked_step = state.global_step
    if bad:
        raise NonFiniteLossError(
            f"non-finite loss (NaN/inf) between global steps {first} and {last}; the last checkpoint "
            "reported before this is the last good one. Lower run.init_lr, check the data, or set "
            "run.skip_nonfinite: true to skip such steps."
        )


def train_step(state: TrainState, batch: Mapping[str, Any], epoch: int, iter_in_epoch: int, log: bool = False,
               micro: int = 0) -> StepOutput:
    """Run micro-batch `iter_in_epoch` of (inner) epoch `epoch`; returns the undivided, detached losses.
    With state.micro_per_step > 1, call it for micro = 0 .. micro_per_step - 1 of step `iter_in_epoch`
    (the schedule position and the step count are the step's; `log` only on the last)."""
    state.scheduler.step(epoch, iter_in_epoch)  # LAVIS: before the forward, every micro-batch
    boundary = (iter_in_epoch * state.micro_per_step + micro + 1) % state.accum_grad_iters == 0
    samples = prepare_samples(with_text_plan(batch, state.unwrapped), state.device, state.image_mean, state.image_std)

    # Skip DDP's gradient all-reduce on non-boundary micro-batches: same maths, less traffic.
    sync_ctx = contextlib.nullcontext()
    if not boundary and hasattr(state.model, "no_sync"):
        sync_ctx = state.model.no_sync()
    with sync_ctx:
        with state.amp.autocast():
            output = state.model(samples)
        raw = _loss_dict(output)
        losses = {k: v.detach().float() for k, v in raw.items()}
        loss = raw["loss"]
        # LAVIS divides in place (`loss /= accum_grad_iters`), which also shrinks the LOGGED total loss
        # (spec §7 item 6, LAVIS#463). We divide only what goes into backward: the logged `loss` is undivided.
        scaled = loss / state.accum_grad_iters
        if state.scaler is not None:
            state.scaler.scale(scaled).backward()
        else:
            scaled.backward()

    # Device-side flag, no sync: error mode checks it lazily (check_finite), skip mode at the optimiser step.
    nonfinite = ~torch.isfinite(losses["loss"])
    state._bad_flag = nonfinite if state._bad_flag is None else state._bad_flag | nonfinite

    state.global_step += int(micro == state.micro_per_step - 1)
    grad_norm = _grad_norm(state) if log else None

    stepped = False
    if boundary:
        skip = False
        if state.skip_nonfinite:
            skip = _any_rank(state._bad_flag)  # one host sync per optimiser step, only in skip mode
            state._bad_flag = None
        if skip:
            state.skipped_nonfinite += 1
        elif state.scaler is not None:
            calls = state._optimizer_calls
            state.scaler.step(state.optimizer)
            state.scaler.update()
            # a fused kernel is always called: whether it applied the step is known on the device only
            stepped = state._optimizer_calls > calls
            state._skipped_by_scaler += int(not stepped)
        else:
            state.optimizer.step()
            stepped = True
        state.optimizer.zero_grad(set_to_none=True)

    return StepOutput(losses=losses, lr=float(state.optimizer.param_groups[0]["lr"]), optimizer_stepped=stepped, grad_norm=grad_norm)

"""Preemption notice: a worker sent SIGTERM finishes its step, every rank checkpoints, then the group restarts.
The grow notice (qformer.train.grow_notice: the cluster can hold more workers) rides on the same vote.

Why this shape:
- The signal itself is noted by qformer.core.signals (install_preemption_handler); this module puts that
  handler where it can run and makes the ranks agree.
- Ray Train V2 runs the training function in a thread of the worker actor, and Python lets only the main
  thread call `signal.signal`. The actor's main thread is idle between Ray's status polls, and
  `RayTrainWorker.execute(fn)` runs `fn` there, so the handler is installed through the worker's own actor
  handle. The handler only sets a flag; the main thread runs it at the next poll (every ~2 s).
- `ray.train.report` is a barrier, so all ranks must agree on the step that checkpoints: `agreed()` is a
  MAX all-reduce of the flags, on a gloo group (CPU, no device sync), at optimiser-step boundaries.
"""
from __future__ import annotations

import threading

import ray
import ray.train
import torch
import torch.distributed as dist

from qformer.core.logs import get_logger
from qformer.core.signals import install_preemption_handler, preemption_requested
from qformer.train.grow_notice import grow_requested

log = get_logger("train")


class PreemptedError(RuntimeError):
    """Raised on every rank after the preemption checkpoint: Ray Train restarts the group from it
    (run.ray.max_failures must allow the restart)."""


class GrowRestart(RuntimeError):
    """Raised on every rank after the grow checkpoint: Ray Train restarts the group from it, at the size the
    cluster now holds (a worker error to Ray: run.ray.max_failures must allow the restart)."""


PREEMPTION, GROW = "preemption", "grow"  # why the ranks stop, in the vote's order of precedence


def install() -> bool:
    """Install the SIGTERM handler on this process's main thread; False when that is not possible here
    (Train local mode runs in the driver, whose Ctrl+C / SIGTERM handling stays as it is)."""
    if threading.current_thread() is threading.main_thread():
        return False
    try:
        actor = ray.get_runtime_context().current_actor
    except Exception:  # not inside an actor
        return False
    try:
        ray.get(actor.execute.remote(install_preemption_handler), timeout=60)
    except Exception as err:  # noqa: BLE001 - without the notice a SIGTERM still ends the worker, as before
        log.warning("could not install the preemption (SIGTERM) handler: %s", err)
        return False
    return True


class StopVote:
    """The cross-rank "stop requested" flags (preemption, grow): one small all-reduce on a CPU (gloo) group."""

    def __init__(self) -> None:
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # a NCCL default group would need a device tensor and a host sync; every rank creates this
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def agreed(self) -> str | None:
        """Why every rank stops (PREEMPTION before GROW) when any rank was asked to, else None (a collective:
        call it at the same steps)."""
        flags = torch.tensor([int(preemption_requested()), int(grow_requested())], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        preempt, grow = flags.tolist()
        return PREEMPTION if preempt else GROW if grow else None


class PreemptionGuard:
    """The loop's side of a preemption notice: vote at optimiser-step boundaries (a checkpoint mid-
    accumulation would lose the accumulated gradients), then, after the checkpoint, stop every rank."""

    def __init__(self, enabled: bool, accum_grad_iters: int, grow: bool = False) -> None:
        """`enabled`: SIGTERM is a notice; `grow`: the grow notice is acted on (elastic runs)."""
        self.vote = None
        if enabled:  # every rank votes at the same steps, also where the handler could not be installed
            install()
        if enabled or grow:
            self.vote = StopVote()
        self.every = max(1, accum_grad_iters)
        self.reason: str | None = None  # PREEMPTION or GROW once agreed

    @property
    def stopping(self) -> bool:
        return self.reason is not None

    @property
    def marker(self) -> str:
        """The MLflow metric that marks the step of this stop's checkpoint."""
        return "grow_checkpoint" if self.reason == GROW else "preemption_checkpoint"

    def stop_agreed(self, i: int) -> bool:
        if self.vote is None or i % self.every:
            return False
        self.reason = self.reason or self.vote.agreed()
        return self.stopping

    def stop(self, step: int, epoch: int, i: int) -> None:
        """After the preemption checkpoint: raise on every rank once Ray Train has registered it. The rank-0
        report (the one with the checkpoint) is slower than the others; raising as soon as ours is queued
        lets the controller restart on the first error, from the checkpoint before. A second report returns
        only when the first was consumed (Ray's result queue holds one), and the barrier holds the other
        ranks until rank 0 is there."""
        ray.train.report({"step": step, "preempted": 1.0})
        if self.vote is not None and self.vote.group is not None:
            dist.barrier(group=self.vote.group)
        if self.reason == GROW:
            raise GrowRestart(f"the cluster holds more workers: every rank saved a checkpoint at global step {step} "
                              f"(epoch {epoch} iter {i}); Ray Train restarts the worker group larger from it")
        raise PreemptedError(f"preempted (SIGTERM): every rank saved a checkpoint at global step {step} (epoch "
                             f"{epoch} iter {i}); Ray Train restarts the worker group from it (run.ray.max_failures)")

"""Preemption notice: a worker sent SIGTERM finishes its step, every rank checkpoints, then the group restarts.

Why this shape:
- Spot instances and Kubernetes send SIGTERM some seconds before the kill. Without a handler Ray's own
  (installed by the worker's main loop) exits at once, and the run loses every step since the last
  periodic checkpoint.
- Ray Train V2 runs the training function in a thread of the worker actor, and Python lets only the main
  thread call `signal.signal`. The actor's main thread is idle between Ray's status polls, and
  `RayTrainWorker.execute(fn)` runs `fn` there, so the handler is installed through the worker's own actor
  handle. The handler only sets a flag; the main thread runs it at the next poll (every ~2 s).
- `ray.train.report` is a barrier, so all ranks must agree on the step that checkpoints: `agreed()` is a
  MAX all-reduce of the flag, on a gloo group (CPU, no device sync), at optimiser-step boundaries.
- A second SIGTERM goes to the handler that was there before (Ray's: exit now), so `kill` twice, or
  Ray's own teardown of a worker group (SIGTERM then SIGKILL), still ends the process.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

from qformer.logging_setup import get_logger

log = get_logger("train")

_requested = threading.Event()
_previous: Any = None


class PreemptedError(RuntimeError):
    """Raised on every rank after the preemption checkpoint: Ray Train restarts the group from it
    (run.ray.max_failures must allow the restart)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    if _requested.is_set() and callable(_previous):  # second notice: do what was there before
        _previous(signum, frame)
        return
    _requested.set()
    log.warning("SIGTERM received: finishing the current step, then every rank saves a checkpoint")


def _install_here() -> str:
    global _previous
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _previous = current
        signal.signal(signal.SIGTERM, _on_sigterm)
    _requested.clear()
    return threading.current_thread().name


def install() -> bool:
    """Install the SIGTERM handler on this process's main thread; False when that is not possible here
    (Train local mode runs in the driver, whose Ctrl+C / SIGTERM handling stays as it is)."""
    if threading.current_thread() is threading.main_thread():
        return False
    import ray

    try:
        actor = ray.get_runtime_context().current_actor
    except Exception:  # not inside an actor
        return False
    try:
        ray.get(actor.execute.remote(_install_here), timeout=60)
    except Exception as err:  # noqa: BLE001 - without the notice a SIGTERM still ends the worker, as before
        log.warning("could not install the preemption (SIGTERM) handler: %s", err)
        return False
    return True


def requested() -> bool:
    """This process got SIGTERM."""
    return _requested.is_set()


class StopVote:
    """The cross-rank "stop requested" flag: one small all-reduce on a CPU (gloo) group."""

    def __init__(self) -> None:
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # a NCCL default group would need a device tensor and a host sync; every rank creates this
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (a collective: call it at the same steps)."""
        flag = torch.tensor([1 if requested() else 0], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

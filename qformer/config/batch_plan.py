"""Elastic training: the per-worker batch, accumulation and LR factor each world size gets (run.elastic.*).

Why a plan per world size: with `run.ray.num_workers: [min, max]` Ray Train restarts the worker group at
whatever size the cluster allows (after a node loss, and again when nodes return), and the optimisation
must not silently change meaning with it.

The configured layout is the reference: run.batch_size_train per worker on `max` workers (or
run.elastic.reference_world), run.accum_grad_iters micro-batches per optimiser step. Every key counted in
steps (warmup_steps, log_freq, save_freq_steps, max_steps_per_epoch, max_iters, iters_per_inner_epoch) and
the checkpoint's position count *reference steps*: one reference step is one micro-batch of the reference
layout, global_batch / accum_grad_iters samples.

- keep=global_batch (default): at world w one step is `micro_per_step` micro-batches of `worker_batch` rows
  on each worker, so it still consumes a reference step's samples, and an optimiser step still averages
  the global batch (accumulation = micro_per_step x accum_grad_iters). Step count, LR schedule (by step,
  hence by optimiser step), epoch length and checkpoint positions do not change at a resize.
- keep=per_worker_batch: batch and accumulation stay as configured, the global batch follows the world
  size, and the LR is scaled by w / reference world (linear, Goyal et al.) or its square root.

No torch here: the driver validates with it before Ray starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qformer.core.errors import ConfigError

KEEP_MODES = ("global_batch", "per_worker_batch")


@dataclass(frozen=True)
class BatchPlan:
    """What one world size trains with."""

    world: int
    worker_batch: int       # rows per micro-batch on each worker
    micro_per_step: int     # micro-batches per (reference) step on each worker
    accum_grad_iters: int   # micro-batches per optimiser step
    lr_scale: float         # factor on the whole LR schedule
    exact: bool = True      # global_batch mode: the configured global batch is met exactly

    @property
    def global_batch(self) -> int:
        """Samples per optimiser step over all workers."""
        return self.worker_batch * self.world * self.accum_grad_iters

    @property
    def samples_per_step(self) -> int:
        """Samples per (reference) step over all workers."""
        return self.worker_batch * self.world * self.micro_per_step


def worker_range(num_workers: Any) -> tuple[int, int]:
    """run.ray.num_workers as (min, max): an int n is (n, n); [min, max] is elastic."""
    if isinstance(num_workers, int):
        return num_workers, num_workers
    low, high = (int(v) for v in num_workers)
    return low, high


def is_elastic(num_workers: Any) -> bool:
    return not isinstance(num_workers, int)


def max_workers(run: Any) -> int:
    """The largest world the run may have (>= 1; Train local mode is one process)."""
    return max(1, worker_range(run.ray.num_workers)[1])


def configured_global_batch(run: Any, workers: tuple[int, int] | None = None) -> int:
    """run.elastic.global_batch, else batch_size_train x max workers x accum_grad_iters."""
    explicit = run.elastic.get("global_batch")
    if explicit:
        return int(explicit)
    high = max(1, (workers or worker_range(run.ray.num_workers))[1])
    return int(run.batch_size_train) * high * int(run.accum_grad_iters)


def plan_for(run: Any, world: int, workers: tuple[int, int] | None = None) -> BatchPlan:
    """The plan for `world` workers. `workers`: the (min, max) the launcher started with (default: from
    run.ray.num_workers; Train local mode passes (1, 1))."""
    workers = workers or worker_range(run.ray.num_workers)
    world = max(1, int(world))
    batch, accum = int(run.batch_size_train), int(run.accum_grad_iters)
    if run.elastic.keep == "per_worker_batch":
        reference = int(run.elastic.get("reference_world") or max(1, workers[1]))
        ratio = world / reference
        scale = ratio if run.elastic.lr_scaling == "linear" else math.sqrt(ratio)
        return BatchPlan(world, batch, 1, accum, scale)
    step_samples = _step_samples(run, workers)
    cap = int(run.elastic.get("max_worker_batch") or batch)
    for micro in range(1, step_samples // world + 1):  # the largest per-worker batch within the cap
        if step_samples % (world * micro) == 0 and step_samples // (world * micro) <= cap:
            return BatchPlan(world, step_samples // (world * micro), micro, micro * accum, 1.0)
    micro = max(1, math.ceil(step_samples / (world * cap)))  # no exact split: the nearest global batch below
    return BatchPlan(world, max(1, step_samples // (world * micro)), micro, micro * accum, 1.0, exact=False)


def _step_samples(run: Any, workers: tuple[int, int]) -> int:
    total, accum = configured_global_batch(run, workers), int(run.accum_grad_iters)
    if total % accum:
        raise _config_error("run.elastic.global_batch", f"{total} is not a multiple of run.accum_grad_iters ({accum}): "
                            "each of the accumulated micro-batches must hold the same number of samples")
    return total // accum


def check(run: Any) -> list[str]:
    """Stop a global_batch run that its smallest world cannot train (ConfigError naming the key), before
    anything starts; return a warning line for each world size in between that can only come near it."""
    if run.elastic.keep != "global_batch":
        return []
    low, high = worker_range(run.ray.num_workers)
    low, high = max(1, low), max(1, high)
    step_samples = _step_samples(run, (low, high))
    total = configured_global_batch(run, (low, high))
    cap = int(run.elastic.get("max_worker_batch") or run.batch_size_train)
    for world, key in ((low, "run.ray.num_workers"), (high, "run.ray.num_workers")):
        if step_samples < world:
            raise _config_error(key, f"{world} workers cannot share a global batch of {total} "
                                     f"({step_samples} samples per micro-batch step): fewer samples than workers")
        if not plan_for(run, world, (low, high)).exact:
            raise _config_error(key, (
                f"run.elastic.keep=global_batch: {world} workers cannot make the global batch {total} exactly "
                f"({step_samples} samples per step is not a multiple of {world} x k with at most {cap} per worker, "
                f"run.elastic.max_worker_batch); set run.elastic.global_batch to a multiple of "
                f"{math.lcm(low, high) * int(run.accum_grad_iters)}, change the worker range, or use "
                "run.elastic.keep=per_worker_batch"))
    warnings = []
    for world in range(low + 1, high):
        plan = plan_for(run, world, (low, high))
        if not plan.exact:
            warnings.append(f"run.elastic.keep=global_batch: at {world} workers the global batch is {plan.global_batch}, "
                            f"not {total} ({step_samples} samples per step do not split evenly over {world} workers)")
    return warnings


def _config_error(key: str, message: str) -> Exception:
    return ConfigError(message, key=key)

"""An elastic run grows at a step boundary, from a checkpoint of that step, instead of mid-step.

Ray Train V2 grows a running elastic group from its controller: every `elastic_resize_monitor_interval_s`
its ElasticScalingPolicy counts the workers that the AutoscalingCoordinator's reservation for the run holds
and, when that is more than run now, stops the group wherever it is and starts a larger one from the last
registered checkpoint; every step since then is trained again. This controller callback makes the same count
(the same reservation, recomputed from the alive nodes, and Ray's own counting), at the same interval, but
only tells the workers (qformer.train.grow_notice): they agree at the next optimiser step boundary, save one
checkpoint and stop, and Ray restarts them at the size the cluster holds (RefreshCapacityOnRetry,
qformer.jobs.elastic_capacity, refreshes Ray's view first). Ray's own check stays on as a backstop, at
BACKSTOP_FACTOR times the interval and at least BACKSTOP_MIN_S apart, for a group that does not act on the
notice (one held in a long evaluation, say).
"""
from __future__ import annotations

import time

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

from qformer.core.logs import get_logger
from qformer.train.grow_notice import request_grow

log = get_logger(__name__)
BACKSTOP_FACTOR, BACKSTOP_MIN_S = 10.0, 300.0
MAX_BACKOFF = 16  # a grow that restarted no larger waits up to this many intervals before the next notice
_COORDINATOR_TIMEOUT_S = 10.0


def ray_resize_interval(interval_s: float, grow_checkpoint: bool) -> float:
    """Ray's own resize check: the configured interval, or its backstop when this callback grows the group."""
    return max(interval_s * BACKSTOP_FACTOR, BACKSTOP_MIN_S) if grow_checkpoint else interval_s


class GrowAtStepBoundary(ControllerCallback, WorkerGroupCallback):
    """Runs in the Train controller: after the worker group's status polls (every ~2 s), at most every
    `interval_s`, asks every worker to grow when the cluster holds more workers than the group has."""

    def __init__(self, scaling_config: ray.train.ScalingConfig, interval_s: float) -> None:
        self.scaling_config, self.interval_s = scaling_config, interval_s
        self.requester_id: str | None = None
        self.group = None
        self.next_check = float("inf")
        self.asked_at_size: int | None = None  # the group size when workers were last told to grow
        self.backoff = 1

    def after_controller_start(self, train_run_context) -> None:
        self.requester_id = f"train-{train_run_context.run_id}"  # Ray's scaling policy asks under this id

    def after_worker_group_start(self, worker_group) -> None:
        """A group that a grow notice restarted but that came back no larger (the placement found less than
        the count promised) waits twice as long for the next notice, so a count Ray cannot place does not
        restart the run every interval."""
        size = len(worker_group.get_workers())
        if self.asked_at_size is not None:
            grew = size > self.asked_at_size
            self.backoff = 1 if grew else min(self.backoff * 2, MAX_BACKOFF)
            if not grew:
                log.warning("the grow restart came back with %d workers (no more than before): the next grow notice "
                            "in %.0f s", size, self.interval_s * self.backoff)
            self.asked_at_size = None
        self.group = worker_group
        self.next_check = time.monotonic() + self.interval_s * self.backoff

    def before_worker_group_shutdown(self, worker_group) -> None:
        self.group = None

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        group = self.group
        if group is None or worker_group_status.errors or worker_group_status.finished:
            return
        now = time.monotonic()
        size = len(group.get_workers())
        if now < self.next_check or size >= self.scaling_config.max_workers:
            return
        self.next_check = now + self.interval_s
        try:
            possible = self.possible_workers()
        except Exception as err:  # noqa: BLE001 - Ray's own resize check remains, as a backstop
            log.warning("could not count the workers the cluster holds (%s); the group grows at Ray's next "
                        "resize check instead", err)
            return
        if possible > size:  # sent again at each check until the group stops: a notice is only a flag
            log.info("the cluster holds %d workers (the group has %d): asking the workers to checkpoint at the "
                     "next step boundary and restart at that size", possible, size)
            self.asked_at_size = size
            for worker in group.get_workers():
                worker.execute_async(request_grow, possible)

    def possible_workers(self) -> int:
        """What Ray's ElasticScalingPolicy would start now: the run's reservation, recomputed from the alive
        nodes, counted with Ray's own rule (fractional and accelerator resources included)."""
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy

        coordinator = get_or_create_autoscaling_coordinator()
        reserved = ray.get(coordinator.get_reserved_resources.remote(self.requester_id, recompute=True),
                           timeout=_COORDINATOR_TIMEOUT_S)
        return ElasticScalingPolicy(self.scaling_config)._count_possible_workers(reserved)

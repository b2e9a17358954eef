"""The grow notice: the cluster can now hold a larger worker group than the one training.

Ray Train's own resize tears the group down wherever it is (mid-step, even mid-save), and the restart trains
again every step since the last checkpoint. Instead, the driver's Train controller (qformer.jobs.elastic_grow)
sets this flag in every worker; the loop votes on it at optimiser-step boundaries together with the
preemption notice (qformer.train.preemption), every rank saves one checkpoint and stops, and Ray restarts
the group at the larger size from that checkpoint: a grow costs no step.

The flag is set by `RayTrainWorker.execute` on the worker actor's main thread while the training function
runs in its own thread; a worker group's processes are new, so a flag never outlives its group.
"""
from __future__ import annotations

import threading

from qformer.core.logs import get_logger

log = get_logger("train")

_requested = threading.Event()


def request_grow(possible_workers: int) -> None:
    """Called in each worker by the controller when `possible_workers` fit the cluster (more than now)."""
    if not _requested.is_set():
        log.info("the cluster can hold %d workers: checkpointing at the next step boundary, then Ray Train "
                 "restarts the group at that size", possible_workers)
    _requested.set()


def grow_requested() -> bool:
    return _requested.is_set()


def clear_grow_request() -> None:
    _requested.clear()

"""Give back the Train worker reservations of trials the scheduler killed.

When ASHA stops a trial, Tune kills the trial's actor, and with it the Train controller that the trial
started. The controller's worker placement group is not freed by that: a non-detached placement group
lives until its creator actor *and* job are gone, i.e. until the sweep driver exits. Train V2 frees it
through a PlacementGroupCleaner actor, but that actor watches the controller through Ray's state API,
which needs the dashboard and a single Ray instance on the host; when the query fails (a test cluster
without a dashboard, several Ray instances on one machine) it gives up, and each stopped trial keeps
its workers' CPUs/GPUs reserved, so later trials wait forever for them.

The sweep driver therefore removes placement groups whose creator actor is dead (never detached
ones): nothing can schedule into them any more, and Ray itself would remove them at job end.
Uses Ray's internal GCS accessor (ray._private.state): there is no public API for a group's creator.
"""
from __future__ import annotations

import time
from typing import Any

import ray
from ray._private import state
from ray.core.generated import gcs_pb2
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, remove_placement_group

from qformer.core.logs import get_logger

log = get_logger(__name__)


def release_orphaned_placement_groups() -> list[str]:
    """Remove live placement groups whose creator *actor* died; return their ids (hex)."""
    removed = []
    live = (gcs_pb2.PlacementGroupTableData.PENDING, gcs_pb2.PlacementGroupTableData.PREPARED,
            gcs_pb2.PlacementGroupTableData.CREATED, gcs_pb2.PlacementGroupTableData.RESCHEDULING)
    for raw in state.state._connect_and_get_accessor().get_placement_group_table():
        info = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if info.state in live and _created_by_an_actor(info) and info.creator_actor_dead and not info.is_detached:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(info.placement_group_id)))
            removed.append(info.placement_group_id.hex())
    if removed:
        log.info("released %d placement group(s) left by stopped trials: %s", len(removed), ", ".join(removed))
    return removed


def _created_by_an_actor(info) -> bool:
    """Driver-created groups (Tune's own trial reservations) have a nil creator actor, reported as dead."""
    actor_id = bytes(info.creator_actor_id)
    return bool(actor_id) and actor_id != b"\xff" * len(actor_id) and actor_id != b"\x00" * len(actor_id)


class PlacementGroupReaper(Callback):
    """Runs the release above from the Tune loop (a killed trial's controller dies a moment after the stop)."""

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self._last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            try:
                release_orphaned_placement_groups()
            except Exception as err:  # noqa: BLE001 - best effort: never fail the sweep over clean-up
                log.warning("placement group clean-up failed: %s", err)

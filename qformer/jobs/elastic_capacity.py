"""An elastic run shrinks at once after a node loss, instead of first waiting for the node that is gone.

Ray Train V2 restarts a failed elastic group at the size its view of the cluster allows. That view is the
reservation Ray Data's AutoscalingCoordinator keeps, which it recomputes from the alive nodes only every
20 s. Right after a node loss it still counts the lost node: the restart asks for the old size, its
placement group cannot be placed, and the group shrinks only after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
(60 s by default) ran out. This controller callback has the coordinator recompute before the controller
acts on a retry, so the restart's decision counts the nodes that are alive now.
"""
from __future__ import annotations

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.failure_handling import FailureDecision

from qformer.core.logs import get_logger

log = get_logger(__name__)
_REFRESH_TIMEOUT_S = 10.0


def refresh_cluster_view() -> None:
    """Recompute the coordinator's reservations from the alive nodes now (its periodic tick, run early).
    `get_reserved_resources(recompute=True)` ticks for every requester; the id asked about is ours only."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    coordinator = get_or_create_autoscaling_coordinator()
    ray.get(coordinator.get_reserved_resources.remote("qformer-elastic-refresh", recompute=True),
            timeout=_REFRESH_TIMEOUT_S)


class RefreshCapacityOnRetry(ControllerCallback):
    """Runs in the Train controller: before a retry after a failure, refresh the cluster view (above)."""

    def before_controller_execute_failure_decision(self, failure_decision: FailureDecision):
        if failure_decision != FailureDecision.RETRY:
            return None
        try:
            refresh_cluster_view()
        except Exception as err:  # noqa: BLE001 - the restart still happens, only possibly after the timeout
            log.warning("could not refresh the cluster view before restarting the worker group (%s): the restart "
                        "may first wait RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for nodes that are gone", err)
        return None

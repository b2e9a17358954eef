"""Connecting to Ray: the configured cluster, the job's cluster, or a private local one; GPU detection."""
from __future__ import annotations

import os

import ray
from omegaconf import DictConfig

from qformer.config import batch_plan
from qformer.core.errors import RayStartError
from qformer.core.logs import get_logger

log = get_logger("ray")


def connect_ray(cfg: DictConfig) -> None:
    """Attach to run.ray.address / RAY_ADDRESS / the job's cluster, else start a private local Ray. That one has
    its dashboard unless run.ray.dashboard is false and the run is in Train local mode: with Train workers,
    Train's placement-group cleaner polls the dashboard's State API and warns every few seconds without it."""
    connect_ray_at(cfg.run.ray.get("address"), dashboard=wants_dashboard(cfg))


def wants_dashboard(cfg: DictConfig) -> bool:
    """Whether a local Ray started for this run serves its dashboard (see connect_ray)."""
    local_mode = batch_plan.worker_range(cfg.run.ray.num_workers)[1] == 0
    return bool(cfg.run.ray.get("dashboard", True)) or not local_mode


def connect_ray_at(address: str | None = None, dashboard: bool = True) -> None:
    """Attach to `address` / RAY_ADDRESS / the job's cluster, else start a private local Ray (with its dashboard
    on loopback unless `dashboard` is False)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address)
            return
        if not dashboard:
            start_local_ray(include_dashboard=False)
            return
        # dashboard on loopback: users get the Ray UI, and Train's placement-group cleaner its State API
        start_local_ray(include_dashboard=True, dashboard_host="127.0.0.1")  # prints the dashboard URL
    except Exception as err:  # a start-up failure is one line that says what to try, not Ray's traceback
        raise RayStartError(_ray_start_advice(address, err)) from None


def start_local_ray(**init_args) -> None:
    """`ray.init(address="local", ...)`, tried a second time when the first start times out: Ray gives a new
    raylet 30 s to register, which a busy machine (a test suite, another job) can exceed once."""
    try:
        ray.init(address="local", **init_args)
    except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for it
        if "timed out during startup" not in str(err):
            raise
        ray.shutdown()  # what the first try started
        log.warning("the local Ray did not register within Ray's 30 s (%s); starting it once more", err)
        ray.init(address="local", **init_args)


def _ray_start_advice(address: str | None, err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    if address:
        return (f"could not connect to the Ray cluster at {address} ({first}); check that it is running and "
                "reachable, or unset run.ray.address / RAY_ADDRESS to start a local Ray")
    return (f"could not start a local Ray ({first}); on a busy machine try again or free some CPUs, attach to "
            f"a running cluster with run.ray.address (or RAY_ADDRESS), and see the Ray logs under "
            f"{os.environ.get('RAY_TMPDIR') or '/tmp'}/ray/session_latest/logs")


def use_gpu(cfg: DictConfig) -> bool:
    value = cfg.run.ray.get("use_gpu", "auto")
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    return cluster_gpus() > 0


def cluster_gpus() -> int:
    """GPUs in the connected cluster (all nodes)."""
    return int(ray.cluster_resources().get("GPU", 0))

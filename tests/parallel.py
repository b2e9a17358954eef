"""How `make test` runs in parallel (pytest-xdist: `-n 3 --dist loadgroup`) on a 2-core machine.

Run one at a time, the suite waits far more than it computes (Ray and MLflow start-ups, status polls,
restarts after injected faults): about a quarter of two cores is busy. Three workers overlap the waits.
What must not run side by side:
- the tests on a session Ray (the `ray_cluster` fixture) share it, so they form a group one worker runs;
  there are two such groups, each on its own worker with its own Ray, split by module
  (SECOND_RAY_MODULES) so that the two take about as long;
- the tests that start Ray clusters of their own (marker `own_ray`: `ray start`, the simulated
  multi-node cluster, driver subprocesses) form a third group, so those run one after another;
- Ray instances starting at the same moment on a 2-core host time out: session Rays start in turns
  (`ray_start_turn`), and the own-Ray group's first test waits until they are up (`wait_for_session_rays`).
Everything else (the unit layer, the MLflow-server tests) is dealt out a test at a time to whichever worker
is free. Under a plain `pytest` (no -n) none of this applies: one process, one Ray, collection order.

The groups come from fixtures (which tests use `ray_cluster`), which only the workers see; they write
them to a file in the run's shared folder, and the controller's scheduler (`GroupScheduling`, xdist's
scope scheduling with these groups as scopes) reads it. (xdist's own `xdist_group` marker does not work
with this pytest: it renames `item._nodeid`, which pytest 9 no longer reads.)
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

OWN_RAY = "own_ray"
FIRST_RAY, SECOND_RAY = "session_ray_1", "session_ray_2"
# ~half the session-Ray time (measured one at a time: these ~240 s, the rest ~270 s, the Tune sweeps most of it)
SECOND_RAY_MODULES = frozenset({
    "test_shards_train.py", "test_process_kills.py", "test_eval_checkpoint.py", "test_shards.py",
    "test_tracking_outage.py", "test_nonfinite.py", "test_storage_faults.py", "test_pipeline.py",
})
GROUP_ORDER = (FIRST_RAY, SECOND_RAY, OWN_RAY)  # first in the queue: each group starts at once on a worker
WAIT_FOR_RAYS_S = 180.0
SHARED_DIR_ENV = "QFORMER_TEST_XDIST_DIR"  # set by the controller, inherited by the workers it starts


def group_of(item: pytest.Item) -> str | None:
    if "ray_cluster" in item.fixturenames:
        return SECOND_RAY if item.path.name in SECOND_RAY_MODULES else FIRST_RAY
    if item.get_closest_marker(OWN_RAY):
        return OWN_RAY
    return None


def under_xdist() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ and SHARED_DIR_ENV in os.environ


def shared_dir() -> Path:
    return Path(os.environ[SHARED_DIR_ENV])


# -- controller side
def configure(config: pytest.Config) -> None:
    """In the controller of a `--dist loadgroup` run: the folder the workers share with it."""
    if getattr(config.option, "dist", "no") == "loadgroup" and "PYTEST_XDIST_WORKER" not in os.environ:
        os.environ[SHARED_DIR_ENV] = tempfile.mkdtemp(prefix="qformer-xdist-")


def unconfigure() -> None:
    if "PYTEST_XDIST_WORKER" not in os.environ and SHARED_DIR_ENV in os.environ:
        shutil.rmtree(os.environ.pop(SHARED_DIR_ENV), ignore_errors=True)


def make_scheduler(config: pytest.Config, log):
    """xdist's scope scheduling, with this module's groups as the scopes and the groups first in the queue."""
    if SHARED_DIR_ENV not in os.environ:
        return None
    from xdist.scheduler import LoadScopeScheduling  # lazy: plain `pytest` runs need no xdist

    class GroupScheduling(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # every worker has collected (and written the file) by the first call
                self.groups = json.loads((shared_dir() / "groups.json").read_text())
            return self.groups.get(nodeid, nodeid)

    config.option.loadscopereorder = False  # keep the workers' order: the groups first
    return GroupScheduling(config, log)


# -- worker side
def plan(items: list[pytest.Item]) -> list[pytest.Item]:
    """Under xdist: `items` reordered with the groups first (in GROUP_ORDER), and the groups written for the
    controller's scheduler. Otherwise `items` as collected."""
    if not under_xdist():
        return items
    grouped: dict[str, list[pytest.Item]] = {name: [] for name in GROUP_ORDER}
    rest = []
    for item in items:
        group = group_of(item)
        (rest if group is None else grouped[group]).append(item)
    tmp = shared_dir() / f"groups.{os.environ['PYTEST_XDIST_WORKER']}.json"
    tmp.write_text(json.dumps({item.nodeid: name for name in GROUP_ORDER for item in grouped[name]}))
    tmp.replace(shared_dir() / "groups.json")  # every worker writes the same map: the last rename wins
    return [item for name in GROUP_ORDER for item in grouped[name]] + rest


@contextlib.contextmanager
def ray_start_turn():
    """Under xdist, hold the run's Ray start lock while a session Ray starts, and note the start for
    `wait_for_session_rays`."""
    if not under_xdist():
        yield
        return
    with open(shared_dir() / "ray_start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with open(shared_dir() / "session_rays_started", "a") as started:
                started.write(f"{os.environ['PYTEST_XDIST_WORKER']}\n")
            fcntl.flock(lock, fcntl.LOCK_UN)


_expected_rays = 0
_waited = False


def note_collected(items: list[pytest.Item]) -> None:
    """How many session Rays this run starts: one per session-Ray group with tests, at most one per worker."""
    global _expected_rays
    groups = {group_of(item) for item in items} & {FIRST_RAY, SECOND_RAY}
    _expected_rays = min(len(groups), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def wait_for_session_rays() -> None:
    """Under xdist, block (once per worker) until this run's session Rays have started, or WAIT_FOR_RAYS_S
    passed: a group whose Ray failed to start must not stall this one; its own tests report that failure."""
    global _waited
    if _waited or not under_xdist():
        return
    _waited = True
    marker = shared_dir() / "session_rays_started"
    deadline = time.monotonic() + WAIT_FOR_RAYS_S
    while time.monotonic() < deadline:
        if marker.exists() and len(marker.read_text().split()) >= _expected_rays:
            return
        time.sleep(0.5)


_handed: dict[str, list] = {}


def hand_over(config: pytest.Config, key: str, rows: list) -> None:
    """Rows for the end-of-run report: an xdist worker sends them to the controller with its results."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        config.workeroutput[key] = config.workeroutput.get(key, []) + rows
    else:
        _handed.setdefault(key, []).extend(rows)


def receive(node, key: str) -> None:
    """In the controller: keep what a finished worker handed over under `key`."""
    _handed.setdefault(key, []).extend(getattr(node, "workeroutput", {}).get(key, []))


def handed(key: str) -> list:
    return _handed.get(key, [])

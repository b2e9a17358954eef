"""The Train controller's grow check (qformer.jobs.elastic_grow), without a cluster: what it tells the workers
and when, given the count of workers the cluster holds."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray.train

from qformer.jobs.elastic_grow import BACKSTOP_MIN_S, GrowAtStepBoundary, ray_resize_interval
from qformer.train.grow_notice import request_grow


class _Worker:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def execute_async(self, fn, *args):
        self.calls.append((fn, *args))


class _Group:
    def __init__(self, size: int) -> None:
        self.workers = [_Worker() for _ in range(size)]

    def get_workers(self):
        return self.workers


RUNNING = SimpleNamespace(errors={}, finished=False)


def _callback(possible, monkeypatch) -> GrowAtStepBoundary:
    callback = GrowAtStepBoundary(ray.train.ScalingConfig(num_workers=(1, 3)), interval_s=0.0)
    counts = iter(possible)
    monkeypatch.setattr(callback, "possible_workers", lambda: next(counts))
    return callback


def test_workers_are_told_to_grow_only_when_the_cluster_holds_more_than_the_group(monkeypatch):
    callback = _callback([1, 3], monkeypatch)
    group = _Group(1)
    callback.after_worker_group_start(group)
    callback.after_worker_group_poll_status(RUNNING)  # holds 1: nothing to say
    assert all(not w.calls for w in group.workers)
    callback.after_worker_group_poll_status(SimpleNamespace(errors={0: "boom"}, finished=False))  # failing: no
    callback.after_worker_group_poll_status(RUNNING)
    assert [w.calls for w in group.workers] == [[(request_grow, 3)]]


def test_a_group_at_its_maximum_or_shutting_down_is_not_asked_and_a_count_that_fails_is_only_a_warning(
        monkeypatch, caplog):
    callback = _callback([], monkeypatch)

    def unreachable() -> int:
        raise TimeoutError("the autoscaling coordinator did not answer")

    monkeypatch.setattr(callback, "possible_workers", unreachable)
    full = _Group(3)
    callback.after_worker_group_start(full)
    callback.after_worker_group_poll_status(RUNNING)
    callback.before_worker_group_shutdown(full)
    callback.after_worker_group_poll_status(RUNNING)
    callback.after_worker_group_start(_Group(1))
    callback.after_worker_group_poll_status(RUNNING)
    assert caplog.text.count("could not count the workers") == 1  # only the 1-worker group was counted
    assert all(not w.calls for w in full.workers)


def test_a_grow_restart_that_came_back_no_larger_backs_off(monkeypatch):
    callback = _callback([2, 2], monkeypatch)
    callback.after_worker_group_start(_Group(1))
    callback.after_worker_group_poll_status(RUNNING)
    callback.after_worker_group_start(_Group(1))  # placed no more than before
    assert callback.backoff == 2
    callback.after_worker_group_poll_status(RUNNING)
    callback.after_worker_group_start(_Group(2))
    assert callback.backoff == 1


@pytest.mark.parametrize("interval, grow, expected", [(60.0, True, 600.0), (5.0, True, BACKSTOP_MIN_S),
                                                      (5.0, False, 5.0)])
def test_ray_s_own_resize_check_is_a_backstop_when_the_platform_grows(interval, grow, expected):
    assert ray_resize_interval(interval, grow) == expected

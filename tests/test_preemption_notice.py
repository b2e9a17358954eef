"""The SIGTERM handler of the preemption notice, with real signals to this process: the first sets the flag
(training goes on to the next step boundary), a second goes to the handler that was there before."""
from __future__ import annotations

import signal

import pytest

from qformer.core import signals
from qformer.train import grow_notice, preemption


@pytest.fixture
def restore_sigterm():
    original = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, original)
    signals.clear_preemption_notice()


def _deliver() -> None:
    signal.raise_signal(signal.SIGTERM)  # a real signal; CPython runs the Python handler before this returns


def test_first_sigterm_requests_a_stop_and_a_second_one_goes_to_the_previous_handler(restore_sigterm):
    seen: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # stands for Ray's exit handler
    assert signals.install_preemption_handler() == "MainThread" and not signals.preemption_requested()
    _deliver()
    assert signals.preemption_requested() and seen == []
    _deliver()
    assert seen == [signal.SIGTERM]


def test_the_vote_without_a_process_group_is_this_process_flag(restore_sigterm):
    vote = preemption.StopVote()
    assert vote.group is None and not vote.agreed()
    signals.install_preemption_handler()
    _deliver()
    assert vote.agreed()


def test_the_grow_notice_rides_on_the_vote_and_a_preemption_takes_precedence(restore_sigterm):
    """The controller's grow notice stops the ranks like a preemption notice, marked apart in MLflow; with both,
    the stop is a preemption (its restart is at whatever size the cluster then holds anyway)."""
    guard = preemption.PreemptionGuard(enabled=False, accum_grad_iters=1, grow=True)
    assert not guard.stop_agreed(1)
    grow_notice.request_grow(2)
    try:
        assert guard.stop_agreed(2) and guard.reason == preemption.GROW and guard.marker == "grow_checkpoint"
        signals.install_preemption_handler()
        _deliver()
        assert preemption.StopVote().agreed() == preemption.PREEMPTION
    finally:
        grow_notice.clear_grow_request()
    assert preemption.PreemptionGuard(enabled=False, accum_grad_iters=1).vote is None  # not elastic: no vote


def test_install_outside_a_ray_actor_thread_leaves_signals_alone(restore_sigterm):
    before = signal.getsignal(signal.SIGTERM)
    assert preemption.install() is False  # the main thread of a driver (Train local mode): keep its handling
    assert signal.getsignal(signal.SIGTERM) is before


def test_after_the_training_a_sigterm_is_the_shutdown_not_a_notice(restore_sigterm, caplog):
    """Ray ends a worker with SIGTERM after the loop returned: no "finishing the current step" warning, and the
    signal goes straight to the handler that was there (Ray's exit) instead of waiting for a force kill."""
    seen: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    signals.install_preemption_handler()
    signals.note_training_finished()
    with caplog.at_level("DEBUG"):
        _deliver()
    assert seen == [signal.SIGTERM] and not signals.preemption_requested()
    assert "SIGTERM received" not in caplog.text
    signals.install_preemption_handler()  # a new training in this process listens again
    _deliver()
    assert signals.preemption_requested() and seen == [signal.SIGTERM]

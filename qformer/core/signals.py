"""SIGTERM handling, in one place: the driver notes a stop, a training worker notes a preemption notice.

Two uses, both only note the signal and leave the action to the code that polls them:
- Driver (`watch_stop_signal`): `ray job stop` sends SIGTERM (then SIGKILL 3 s later). ray.init's own
  handler exits, which Ray re-raises inside `ray.get` as a plain SystemExit(1), so the exception alone
  cannot tell a stopped run from a broken one; `stopped_by_signal()` can.
- Training worker (`install_preemption_handler`): spot instances and Kubernetes send SIGTERM some seconds
  before the kill; the handler sets a flag the loop reads at optimiser-step boundaries
  (qformer.train.preemption votes on it across ranks). A second SIGTERM goes to the handler that was
  there before (Ray's: exit now), so `kill` twice, or Ray's teardown of a worker group, still ends it.

Python runs handlers on the main thread only, so both install there (the caller makes sure of it).
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable

from qformer.core.logs import get_logger

log = get_logger("signals")

_stop_signals: set[int] = set()  # stop signals this (driver) process received
_on_stop: dict[str, Callable[[], None]] = {}  # what the watched SIGTERM does first (see on_stop_signal)
_preemption_requested = threading.Event()
_training_finished = threading.Event()
_previous_handler: Any = None


def watch_stop_signal() -> None:
    """Note a SIGTERM, then hand it to the handler already set. Main thread only; idempotent."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or getattr(previous, "qformer_watch", False):
        return

    def note(signum, frame):
        _stop_signals.add(signum)
        for key, action in list(_on_stop.items()):
            try:
                action()
            except Exception as err:  # noqa: BLE001 - the stop goes on; the action's owner reports it again later
                log.warning("SIGTERM: %s failed (%s)", key, err)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)  # the default action, but through the `except`/`finally` blocks

    note.qformer_watch = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, note)


def on_stop_signal(key: str, action: Callable[[], None] | None) -> None:
    """Run `action` first thing when the watched SIGTERM arrives (None removes it). For what must be done within
    `ray job stop`'s 3 s before its SIGKILL whatever else is slow then: closing the open MLflow run as KILLED.
    Aborting the Train controller comes after and took longer than 3 s on a busy machine, which left the run
    RUNNING for ever."""
    if action is None:
        _on_stop.pop(key, None)
    else:
        _on_stop[key] = action


def stopped_by_signal() -> bool:
    """This process received SIGTERM while watched (a stop, not a failure)."""
    return signal.SIGTERM in _stop_signals


def clear_stop_signals() -> None:
    _stop_signals.clear()


def _on_preemption_notice(signum: int, frame: Any) -> None:
    # a second notice, or any after the training finished (Ray shutting the worker down): what was there before
    if (_preemption_requested.is_set() or _training_finished.is_set()) and callable(_previous_handler):
        _previous_handler(signum, frame)
        return
    if _training_finished.is_set():
        return
    _preemption_requested.set()
    log.warning("SIGTERM received: finishing the current step, then every rank saves a checkpoint")


def install_preemption_handler() -> str:
    """Make SIGTERM a preemption notice in this thread's process (call on the main thread); clears an old
    notice. Returns the thread's name (the caller checks where it ran)."""
    global _previous_handler
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_preemption_notice:
        _previous_handler = current
        signal.signal(signal.SIGTERM, _on_preemption_notice)
    _preemption_requested.clear()
    _training_finished.clear()
    return threading.current_thread().name


def preemption_requested() -> bool:
    """This process got a preemption notice (SIGTERM)."""
    return _preemption_requested.is_set()


def clear_preemption_notice() -> None:
    _preemption_requested.clear()
    _training_finished.clear()


def note_training_finished() -> None:
    """The training loop is done: from now on a SIGTERM is the worker's shutdown, not a preemption notice (no
    "finishing the current step" warning at a normal exit)."""
    _training_finished.set()

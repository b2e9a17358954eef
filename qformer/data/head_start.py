"""A stream's next pass started ahead, in a background thread, up to its first batch.

Ray Data starts a new execution for every pass over a dataset (each `iter_torch_batches`): planning,
a CPU grant from the autoscaling coordinator that comes once a second, and a whole first read task
before the first batch (1.7-1.9 s on the demo). A reader that knows the pass it reads has ended, and
that another follows, starts that one here, so the start overlaps what it still does with the last
batches (in training: the last step, the epoch-end checkpoint, an evaluation). Only the first batch is
read ahead; it waits here until `take` hands the pass over. Nothing here knows about positions: the
caller decides what the pass reads before starting it (qformer.train.streams).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

from qformer.core.logs import get_logger

log = get_logger("data")

_END = object()
CLOSE_WAIT_S = 30.0  # a start blocked longer (a rank that never reached the pass) is left to end on its own


class HeadStart:
    """`make()`'s iterator, started in a daemon thread that reads its first item and stops there."""

    def __init__(self, make: Callable[[], Iterator[Any]], name: str = "qformer-next-pass") -> None:
        self._make = make
        self._lock = threading.Lock()
        self._iter: Iterator[Any] | None = None
        self._first: Any = _END
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._start, name=name, daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            it = iter(self._make())
            first = next(it, _END)
        except BaseException as err:  # handed to take(), in the reader's thread
            self._error = err
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._iter, self._first = it, first
        if closed:  # close() came first: this thread ends what it started
            _close(it)

    @property
    def started(self) -> bool:
        """The first item (or the pass's end, or an error) is here: take() would not wait."""
        return not self._thread.is_alive()

    def take(self) -> Iterator[Any]:
        """The pass: its first item (waited for here), then the rest. Raises what starting it raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        with self._lock:
            if self._closed:
                raise RuntimeError("HeadStart.take() after close()")
            it, first, self._iter, self._closed = self._iter, self._first, None, True
        return _resumed(first, it)

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Ends the started pass (Ray's iterator closed) and the thread; idempotent."""
        with self._lock:
            self._closed = True
            it, self._iter = self._iter, None
        if it is not None:
            _close(it)
        self._thread.join(wait_s)
        if self._thread.is_alive():
            log.warning("the next pass's start did not end within %.0f s of close(); its thread closes it when "
                        "its first batch comes", wait_s)


def _resumed(first: Any, it: Iterator[Any] | None) -> Iterator[Any]:
    try:
        if first is not _END:
            yield first
            yield from it
    finally:
        _close(it)


def _close(it: Any) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()

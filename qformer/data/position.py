"""Where a training stream is: which pass over its data, and which read units of that pass are trained on.

Every training row carries two int64 columns, added where it is read:
- `unit`: task << 24 | chunk << 1 | last. A read task reads one group of rows of the pass (a slice of
  the permuted annotation table, or one shard); it hands them on in chunks of about run.data.task_rows
  rows; `last` marks its final chunk.
- `unit_rows`: how many rows of that unit reach training (the decode UDF lowers it when it drops
  undecodable images; it processes one whole chunk per call, so it knows).
A unit is done when the ranks together consumed `unit_rows` of its rows; a task is done when all its
chunks up to the `last` one are. The checkpoint stores, per stream, the pass and the done tasks and
chunks; a resumed run (same or different world size) reads the pass again without them. So a resume
repeats at most the partly consumed chunk of each rank and skips nothing (prefetched rows not yet
trained on are not counted as consumed).

The training loop tells the Ray Data source which pass to read through a `StreamPlan` actor: every
rank writes the same position before it starts iterating, and Ray Data's split coordinator plans the
read only when all ranks have arrived at its epoch barrier, so it sees that position. The epoch comes
from the training state, not from Ray Data's execution count.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

UNIT, UNIT_ROWS = "unit", "unit_rows"
_TASK_SHIFT = 24


def encode_unit(task: int, chunk: int, last: bool) -> int:
    return (int(task) << _TASK_SHIFT) | (int(chunk) << 1) | int(bool(last))


def decode_unit(unit: int) -> tuple[int, int, bool]:
    unit = int(unit)
    return unit >> _TASK_SHIFT, (unit & ((1 << _TASK_SHIFT) - 1)) >> 1, bool(unit & 1)


@dataclass
class StreamPosition:
    """One stream's place: the pass being read, its finished tasks, and finished chunks of other tasks."""

    pass_: int = 0
    done_tasks: set[int] = field(default_factory=set)
    done_chunks: dict[int, set[int]] = field(default_factory=dict)
    last_chunk: dict[int, int] = field(default_factory=dict)  # of tasks in done_chunks, once known

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_, "done_tasks": sorted(self.done_tasks),
                "done_chunks": {str(t): sorted(c) for t, c in sorted(self.done_chunks.items())},
                "last_chunk": {str(t): c for t, c in sorted(self.last_chunk.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "StreamPosition":
        if not data:
            return cls()
        return cls(int(data.get("pass", 0)), {int(t) for t in data.get("done_tasks", [])},
                   {int(t): {int(c) for c in cs} for t, cs in (data.get("done_chunks") or {}).items()},
                   {int(t): int(c) for t, c in (data.get("last_chunk") or {}).items()})

    def rows_skipped_by(self, task: int, chunk: int) -> bool:
        return task in self.done_tasks or chunk in self.done_chunks.get(task, ())


class PositionTracker:
    """Counts, per stream, the rows this rank trains on by unit; `settle` merges all ranks' counts.

    `observe` keeps the batch's (device) unit tensors without reading them, so there is no host sync per
    step; they are read once per checkpoint in `settle`, which is a collective (all ranks call it at the
    same step, as they call the checkpoint report)."""

    def __init__(self, position: StreamPosition | None = None) -> None:
        self.position = position or StreamPosition()
        self._pending: list[tuple[Any, Any]] = []
        self._counts: dict[int, int] = {}  # merged over ranks, units not yet done
        self._rows: dict[int, int] = {}

    def start_pass(self, pass_: int) -> None:
        if pass_ != self.position.pass_:
            self.position = StreamPosition(pass_)
            self._pending.clear()
            self._counts.clear()
            self._rows.clear()

    def observe(self, batch: dict) -> None:
        """Take the position columns out of `batch` (the train step never sees them)."""
        unit, rows = batch.pop(UNIT, None), batch.pop(UNIT_ROWS, None)
        if unit is not None and rows is not None:
            self._pending.append((unit, rows))

    def local_counts(self) -> dict[int, tuple[int, int]]:
        """unit -> (rows consumed here since the last settle, unit_rows)."""
        out: dict[int, tuple[int, int]] = {}
        for unit, rows in self._pending:
            unit = np.asarray(unit.cpu() if hasattr(unit, "cpu") else unit, dtype=np.int64)
            rows = np.asarray(rows.cpu() if hasattr(rows, "cpu") else rows, dtype=np.int64)
            for u, n, r in zip(*np.unique(unit, return_counts=True), _first_of(unit, rows)):
                seen, _ = out.get(int(u), (0, int(r)))
                out[int(u)] = (seen + int(n), int(r))
        self._pending.clear()
        return out

    def settle(self, gather: Callable[[Any], list[Any]] = lambda x: [x]) -> StreamPosition:
        """Merge every rank's counts (`gather`: all_gather_object) and return the updated position."""
        for counts in gather(self.local_counts()):
            for unit, (seen, rows) in counts.items():
                self._counts[unit] = self._counts.get(unit, 0) + seen
                self._rows[unit] = rows
        pos = self.position
        for unit in [u for u, n in self._counts.items() if n >= self._rows[u]]:
            task, chunk, last = decode_unit(unit)
            del self._counts[unit], self._rows[unit]
            pos.done_chunks.setdefault(task, set()).add(chunk)
            if last:
                pos.last_chunk[task] = chunk
        for task in [t for t in pos.done_chunks if t in pos.last_chunk]:
            if len(pos.done_chunks[task]) == pos.last_chunk[task] + 1:
                pos.done_tasks.add(task)
                del pos.done_chunks[task], pos.last_chunk[task]
        return pos


def _first_of(unit: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """unit_rows of each distinct unit, in np.unique's order."""
    _, index = np.unique(unit, return_index=True)
    return rows[index]


class _StreamPlan:
    """stream name -> position dict; written by the training ranks, read by the Ray Data source."""

    def __init__(self) -> None:
        self._plans: dict[str, dict] = {}

    def set(self, stream: str, position: dict) -> None:
        self._plans[stream] = position

    def get(self, stream: str) -> dict | None:
        return self._plans.get(stream)


def create_plan():
    """A small actor owned by the caller (the launcher's driver), so it ends with the job."""
    import ray

    return ray.remote(num_cpus=0)(_StreamPlan).remote()


def read_plan(plan, stream: str) -> StreamPosition:
    """The position the training loop asked for (pass 0, nothing done, without a plan)."""
    if plan is None:
        return StreamPosition()
    import ray

    return StreamPosition.from_dict(ray.get(plan.get.remote(stream)))

"""Where a training stream is: which pass over its data, and which read units of that pass are trained on.

Every training row carries two int64 columns, added where it is read:
- `unit`: task << 24 | chunk << 1 | last. A read task reads one group of rows of the pass (a slice of
  the permuted annotation table, or one shard); it hands them on in chunks of about run.data.task_rows
  rows; `last` marks its final chunk.
- `unit_row`: the row's offset in its unit;
- `unit_rows`: how many rows of that unit this read delivers to training (the decode UDF lowers it when
  it drops undecodable images; a chunk reaches it in one call, so it knows).
A unit is done when the ranks together trained on `unit_rows` of its rows; a task is done when all its
chunks up to the `last` one are. The checkpoint stores, per stream, the pass, the done tasks and
chunks, and the row offsets already trained on in unfinished chunks; a resumed run (same or different
world size) reads the pass again without any of them. So a resume repeats nothing and skips nothing
(prefetched rows not yet trained on are not counted as trained).

The training loop tells the Ray Data source which pass to read through a `StreamPlan` (in Ray's key-value
store): every rank writes the same position before it starts iterating, and Ray Data's split coordinator
plans the read only when all ranks have arrived at its epoch barrier, so it sees that position. The epoch comes
from the training state, not from Ray Data's execution count.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

UNIT, UNIT_ROWS, ROW = "unit", "unit_rows", "unit_row"
_TASK_SHIFT = 24


def encode_unit(task: int, chunk: int, last: bool) -> int:
    return (int(task) << _TASK_SHIFT) | (int(chunk) << 1) | int(bool(last))


def unit_key(aug_seed: int, unit: int) -> str:
    """A read unit's name in the lost-sample ledger (qformer.data.stats): its augmentation seed (drawn from
    run.seed, stream, pass and task, and chunk for shards) with its unit id is unique within a run."""
    return f"{int(aug_seed)}:{int(unit)}"


def decode_unit(unit: int) -> tuple[int, int, bool]:
    unit = int(unit)
    return unit >> _TASK_SHIFT, (unit & ((1 << _TASK_SHIFT) - 1)) >> 1, bool(unit & 1)


@dataclass
class StreamPosition:
    """One stream's place: the pass being read, its finished tasks, finished chunks of other tasks, and
    the rows (by `row` offset) already trained on in chunks not finished yet."""

    pass_: int = 0
    done_tasks: set[int] = field(default_factory=set)
    done_chunks: dict[int, set[int]] = field(default_factory=dict)
    last_chunk: dict[int, int] = field(default_factory=dict)  # of tasks in done_chunks, once known
    partial: dict[int, set[int]] = field(default_factory=dict)  # unit -> row offsets trained on

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_, "done_tasks": sorted(self.done_tasks),
                "done_chunks": {str(t): sorted(c) for t, c in sorted(self.done_chunks.items())},
                "last_chunk": {str(t): c for t, c in sorted(self.last_chunk.items())},
                "partial": {str(u): sorted(r) for u, r in sorted(self.partial.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "StreamPosition":
        if not data:
            return cls()
        return cls(int(data.get("pass", 0)), {int(t) for t in data.get("done_tasks", [])},
                   {int(t): {int(c) for c in cs} for t, cs in (data.get("done_chunks") or {}).items()},
                   {int(t): int(c) for t, c in (data.get("last_chunk") or {}).items()},
                   {int(u): {int(r) for r in rs} for u, rs in (data.get("partial") or {}).items()})

    def rows_skipped_by(self, task: int, chunk: int) -> bool:
        return task in self.done_tasks or chunk in self.done_chunks.get(task, ())

    def rows_to_read(self, unit: int, n: int) -> np.ndarray:
        """Offsets 0..n-1 of `unit`'s rows minus those already trained on."""
        done = self.partial.get(int(unit))
        keep = np.arange(n)
        return keep[~np.isin(keep, list(done))] if done else keep


class PositionTracker:
    """Records, per stream, the rows this rank trains on by (unit, row offset); `settle` merges all ranks'.

    `observe` keeps the batch's (device) position tensors without reading them, so there is no host sync
    per step; they are read once per checkpoint in `settle`, which is a collective (all ranks call it at
    the same step, as they call the checkpoint report). A unit is done when the rows seen since this read
    of it began reach its `unit_rows` (the rows this read delivers: a resumed read leaves out `partial`)."""

    def __init__(self, position: StreamPosition | None = None) -> None:
        self.position = position or StreamPosition()
        self._pending: list[tuple[Any, Any, Any]] = []
        self._seen: dict[int, set[int]] = {}  # merged over ranks, units not yet done: offsets seen in this read
        self._rows: dict[int, int] = {}

    def start_pass(self, pass_: int) -> None:
        if pass_ != self.position.pass_:
            self.position = StreamPosition(pass_)
            self._pending.clear()
            self._seen.clear()
            self._rows.clear()

    def observe(self, batch: dict) -> None:
        """Take the position columns out of `batch` (the train step never sees them)."""
        unit, rows, row = batch.pop(UNIT, None), batch.pop(UNIT_ROWS, None), batch.pop(ROW, None)
        if unit is not None and rows is not None and row is not None:
            self._pending.append((unit, rows, row))

    def local_counts(self) -> dict[int, tuple[list[int], int]]:
        """unit -> (row offsets consumed here since the last settle, unit_rows)."""
        out: dict[int, tuple[list[int], int]] = {}
        for unit, rows, row in self._pending:
            unit, rows, row = (np.asarray(x.cpu() if hasattr(x, "cpu") else x, dtype=np.int64) for x in (unit, rows, row))
            for u in np.unique(unit):
                here = unit == u
                seen, _ = out.get(int(u), ([], 0))
                out[int(u)] = (seen + row[here].tolist(), int(rows[here][0]))
        self._pending.clear()
        return out

    def settle(self, gather: Callable[[Any], list[Any]] = lambda x: [x]) -> StreamPosition:
        """Merge every rank's rows (`gather`: all_gather_object) and return the updated position."""
        pos = self.position
        for counts in gather(self.local_counts()):
            for unit, (offsets, rows) in counts.items():
                self._seen.setdefault(unit, set()).update(offsets)
                self._rows[unit] = rows
                pos.partial.setdefault(unit, set()).update(offsets)
        for unit in [u for u, seen in self._seen.items() if len(seen) >= self._rows[u]]:
            task, chunk, last = decode_unit(unit)
            del self._seen[unit], self._rows[unit]
            pos.partial.pop(unit, None)
            pos.done_chunks.setdefault(task, set()).add(chunk)
            if last:
                pos.last_chunk[task] = chunk
        for task in [t for t in pos.done_chunks if t in pos.last_chunk]:
            if len(pos.done_chunks[task]) == pos.last_chunk[task] + 1:
                pos.done_tasks.add(task)
                del pos.done_chunks[task], pos.last_chunk[task]
        return pos


PLAN_TIMEOUT_S = 300.0
_PLAN_NAMESPACE = "qformer_stream_plans"


@dataclass(frozen=True)
class StreamPlan:
    """stream name -> position dict of one launch; written by the training ranks, read by the Ray Data sources.

    It lives in the Ray cluster's own key-value store (the GCS, on the head node), not in an actor: nothing is
    started per run (an actor cost a worker process and ~1 s of CPU each launch), and nothing dies with a
    preempted worker node. Any process of the cluster reaches it; `close` deletes the launch's keys. A call
    that gets no answer within its timeout (seen once with the actor this replaced, on an overloaded node) is
    an error naming the stream, not a wait without end that no signal can interrupt."""

    key: str

    def set(self, stream: str, position: dict, timeout_s: float = PLAN_TIMEOUT_S) -> None:
        self._call("put", stream, timeout_s, json.dumps(position).encode())

    def get(self, stream: str, timeout_s: float = PLAN_TIMEOUT_S) -> dict | None:
        value = self._call("get", stream, timeout_s)
        return None if value is None else json.loads(value)

    def close(self, timeout_s: float = 10.0) -> None:
        """Delete the launch's keys (a driver that dies first leaves a few hundred bytes until the cluster stops).
        A short wait: it runs as the launch ends, also when the cluster is gone and the exit should not wait."""
        self._call("del", "", timeout_s)

    def _call(self, op: str, stream: str, timeout_s: float, value: bytes | None = None):
        import ray  # lazy: `qformer config` imports this module (builders -> retrieval -> transform) without Ray
        from ray.experimental.internal_kv import internal_kv_get_gcs_client

        gcs, key, space = internal_kv_get_gcs_client(), f"{self.key}/{stream}".encode(), _PLAN_NAMESPACE.encode()
        if gcs is None:
            raise RuntimeError(f"the stream plan {self.key!r} needs a connected Ray (stream {stream!r})")
        try:
            if op == "put":
                return gcs.internal_kv_put(key, value, True, space, timeout=timeout_s)
            if op == "get":
                return gcs.internal_kv_get(key, space, timeout=timeout_s)
            return gcs.internal_kv_del(key, True, space, timeout=timeout_s)
        except (ray.exceptions.RpcError, ray.exceptions.GetTimeoutError, TimeoutError) as err:
            raise RuntimeError(f"the stream plan in Ray's key-value store did not answer for stream {stream!r} "
                               f"within {timeout_s:.0f} s ({type(err).__name__}: is Ray's head node overloaded or "
                               "unreachable? see `ray status` and the Ray logs)") from None


def create_plan() -> StreamPlan:
    """A new, empty plan for one launch (its keys are unique to it)."""
    import uuid

    return StreamPlan(f"plan-{uuid.uuid4().hex}")


def read_plan(plan: StreamPlan | None, stream: str, timeout_s: float = PLAN_TIMEOUT_S) -> StreamPosition:
    """The position the training loop asked for (pass 0, nothing done, without a plan)."""
    return StreamPosition() if plan is None else StreamPosition.from_dict(plan.get(stream, timeout_s))

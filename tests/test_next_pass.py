"""An epoch-based run starts the next epoch's pass when this epoch's reading ends (qformer.data.head_start):
each epoch still reads the rows of its own pass in the same order, checkpoints never count the batch read
ahead, the last epoch starts nothing, and a stop leaves no thread behind. No timings here: the gain is
measured by `qformer bench data`."""
from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest
import torch
from omegaconf import OmegaConf

from qformer.config import batch_plan
from qformer.data.epoch_rows import EpochShuffledRows
from qformer.data.head_start import HeadStart
from qformer.data.position import ROW, UNIT, UNIT_ROWS

N_ROWS, TASK_ROWS, BATCH = 24, 8, 2


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("qformer-next-pass")]


class _Plan:
    """The stream plan's two calls, answered in-process (no Ray: the last test runs on the real one)."""

    def __init__(self) -> None:
        self.plans: dict[str, dict] = {}

    def set(self, stream: str, position: dict) -> None:
        self.plans[stream] = position

    def get(self, stream: str, timeout_s: float) -> dict | None:
        return self.plans.get(stream)


class _Shard:
    """A rank's shard over EpochShuffledRows: each iteration plans its read from the plan when it starts, as
    Ray Data's execution does, and hands out host batches with the position columns."""

    def __init__(self, plan: _Plan) -> None:
        table = pa.table({"idx": np.arange(N_ROWS)})
        self.source = EpochShuffledRows(table, TASK_ROWS, seed=3, plan=plan, stream="train")
        self.started: list[int] = []  # the pass of each iteration, in start order
        self.closed = 0

    def iter_torch_batches(self, batch_size: int, **_: object):
        self.started.append(int(self.source._plan.plans["train"]["pass"]))
        rows = pa.concat_tables([block for task in self.source.get_read_tasks(1) for block in task()])
        try:
            for lo in range(0, rows.num_rows - batch_size + 1, batch_size):
                part = rows.slice(lo, batch_size)
                yield {c: torch.tensor(part.column(c).to_numpy()) for c in ("idx", UNIT, UNIT_ROWS, ROW)}
        finally:
            self.closed += 1


def _streams(monkeypatch, max_steps_per_epoch=None):
    import ray.train

    from qformer.train.streams import TrainingStreams

    plan = _Plan()
    shard = _Shard(plan)
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: shard)
    run = OmegaConf.create({"seed": 1, "batch_size_train": BATCH, "accum_grad_iters": 1,
                            "max_steps_per_epoch": max_steps_per_epoch, "ray": {"num_workers": 1},
                            "elastic": {"keep": "global_batch", "global_batch": None, "max_worker_batch": None},
                            "data": {"shuffle_buffer": 0, "prefetch_batches": 1}})
    streams = TrainingStreams(run, batch_plan.plan_for(run, 1, (1, 1)), None, {"train": N_ROWS}, plan, None, rank=0)
    return streams, shard


def _epochs(streams, n_epochs: int, ahead: bool, on_last=None) -> list[list[int]]:
    """The rows each epoch trains on, epochs read as the loop reads them."""
    out = []
    for epoch in range(n_epochs):
        rows = []
        for group, last in streams.steps(epoch, 0, start_next=ahead and epoch + 1 < n_epochs):
            rows += [int(x) for micro in group for x in micro["idx"]]
            if last and on_last is not None:
                on_last(epoch)
        out.append(rows)
    streams.close()
    return out


def test_every_epoch_reads_the_rows_of_its_own_pass_in_the_same_order_as_without_the_head_start(monkeypatch):
    before, _ = _streams(monkeypatch)
    old = _epochs(before, 3, ahead=False)
    after, shard = _streams(monkeypatch)
    new = _epochs(after, 3, ahead=True)
    assert new == old
    assert old[0] != old[1] != old[2]  # (each pass is its own permutation)
    for epoch, rows in enumerate(new):
        assert rows == shard.source.order(epoch).tolist()
    assert shard.started == [0, 1, 2] and not _threads()


def test_the_next_pass_starts_as_the_read_ahead_sees_the_end_and_its_batch_is_not_in_the_checkpoint(monkeypatch):
    streams, shard = _streams(monkeypatch)
    seen = {}

    def on_last(epoch: int) -> None:  # the loop trains the epoch's last step and checkpoints here
        if epoch == 0:
            while not streams._next["train"][1].started:
                threading.Event().wait(0.01)
            seen["started"] = list(shard.started)
            seen["position"] = streams.settled_positions()["train"]
        else:  # the last epoch of the run starts nothing
            seen["last_epoch_ahead"] = dict(streams._next)

    _epochs(streams, 2, ahead=True, on_last=on_last)
    assert seen["started"] == [0, 1]  # pass 1 already running while epoch 0's last step trains
    # the epoch-end checkpoint: pass 0, all of its tasks done; nothing of pass 1 counted
    assert seen["position"]["pass"] == 0 and seen["position"]["done_tasks"] == [0, 1, 2]
    assert seen["position"]["partial"] == {}
    assert seen["last_epoch_ahead"] == {} and shard.started == [0, 1] and not _threads()


def test_a_counted_epoch_ends_its_pass_when_its_last_step_is_read(monkeypatch):
    """With run.max_steps_per_epoch the loop counts: the pass ends (and the next starts) when the last
    counted step is read, not when the loop closes the stream after training it."""
    streams, shard = _streams(monkeypatch, max_steps_per_epoch=4)
    steps = streams.steps(0, 0, start_next=True)
    for _ in range(3):
        next(steps)
    assert shard.started == [0] and "train" not in streams._next
    next(steps)  # the 4th (last) step
    assert shard.closed == 1 and "train" in streams._next
    steps.close()
    rows = [int(x) for group, _ in streams.steps(1, 0, start_next=False) for micro in group for x in micro["idx"]]
    assert rows[:8] == shard.source.order(1)[:8].tolist() and shard.started == [0, 1]
    streams.close()
    assert not _threads()


def test_a_stop_mid_epoch_starts_nothing_and_a_stop_after_the_start_leaves_no_thread(monkeypatch):
    streams, shard = _streams(monkeypatch)
    steps = streams.steps(0, 0, start_next=True)
    next(steps)
    steps.close()  # preemption / an error mid-epoch
    streams.close()
    assert shard.started == [0] and not streams._next and not _threads()

    streams, shard = _streams(monkeypatch)
    steps = list(streams.steps(0, 0, start_next=True))  # read to its end: pass 1 started ahead
    assert steps[-1][1] is True and "train" in streams._next
    streams.close()  # e.g. a preemption checkpoint at the epoch end, then the raise
    assert not streams._next and not _threads() and shard.closed == 2  # pass 1's iterator closed too


def test_head_start_reads_only_the_first_item_until_taken_and_passes_errors_on():
    read = []

    def items():
        for i in range(3):
            read.append(i)
            yield i

    ahead = HeadStart(items)
    ahead._thread.join()
    assert read == [0]
    assert list(ahead.take()) == [0, 1, 2]

    def broken():
        raise ValueError("no pass")
        yield

    with pytest.raises(ValueError, match="no pass"):
        HeadStart(broken).take()


def test_head_start_closed_before_its_first_item_closes_the_pass_itself():
    gate, closed = threading.Event(), threading.Event()

    def slow():
        try:
            gate.wait()
            yield 1
        finally:
            closed.set()

    ahead = HeadStart(slow)
    threading.Timer(0.2, gate.set).start()
    ahead.close()  # waits for the start, which then ends what it started
    assert closed.is_set() and not _threads()


def test_bench_data_reads_a_sides_epochs_as_training_does():
    """`qformer bench data`'s Ray sides: the next epoch started ahead only where one follows (or never, for
    the fresh-start side), the same items either way, nothing left running."""
    from qformer.bench.data import _TrainingRead

    for ahead in (True, False):
        starts = []

        def make():
            starts.append(len(starts))
            return (i for i in range(3))

        reader = _TrainingRead(make, ahead=ahead)
        first = reader.epoch(next_epoch=True)
        assert [next(first), next(first), next(first)] == [0, 1, 2]
        assert len(starts) == (2 if ahead else 1)  # the read-ahead saw the end before the last item went out
        assert list(first) == [] and list(reader.epoch(next_epoch=False)) == [0, 1, 2]
        assert len(starts) == 2 and reader.next is None and not _threads()
        reader.epoch(next_epoch=True)  # (never iterated: starts nothing)
        reader.close()
        assert len(starts) == 2


@pytest.mark.ray
def test_two_ranks_on_a_streaming_split_start_each_next_pass_ahead_in_lockstep(ray_cluster, monkeypatch):
    """Real Ray Data: two ranks (threads) on one streaming_split of the epoch-shuffled rows, with the run's
    stream plan. Each starts the next epoch's pass when its reading ends; the split coordinator starts
    that execution once both have. Every epoch hands out exactly the rows of its own pass (by the augmentation
    seed each read task adds: drawn from the pass and the task), both ranks flag the same last step, and
    nothing is left running."""
    import ray.train

    from qformer.data.epoch_rows import epoch_shuffled_dataset
    from qformer.data.position import create_plan
    from qformer.train.streams import TrainingStreams

    n_rows, task_rows, epochs = 64, 16, 3
    plan = create_plan()
    table = pa.table({"idx": np.arange(n_rows)})
    source = EpochShuffledRows(table, task_rows, seed=5, seed_column="aug_seed")
    splits = iter(epoch_shuffled_dataset(table, task_rows, 5, seed_column="aug_seed", plan=plan,
                                         stream="train").streaming_split(2, equal=True))
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: next(splits))
    taken, take = [], HeadStart.take
    monkeypatch.setattr(HeadStart, "take", lambda self: taken.append(1) or take(self))
    run = OmegaConf.create({"seed": 1, "batch_size_train": 4, "accum_grad_iters": 1, "max_steps_per_epoch": None,
                            "ray": {"num_workers": 2},
                            "elastic": {"keep": "global_batch", "global_batch": None, "max_worker_batch": None},
                            "data": {"shuffle_buffer": 0, "prefetch_batches": 1}})
    plan_ = batch_plan.plan_for(run, 2, (2, 2))
    ranks = [TrainingStreams(run, plan_, None, {"train": n_rows}, plan, None, rank=r) for r in range(2)]
    seen: dict[int, list[list[tuple[int, int, bool]]]] = {}
    errors: list[BaseException] = []

    def read(rank: int) -> None:
        try:
            out = []
            for epoch in range(epochs):
                rows = []
                for group, last in ranks[rank].steps(epoch, 0, start_next=epoch + 1 < epochs):
                    rows += [(int(i), int(s), last) for micro in group
                             for i, s in zip(micro["idx"], micro["aug_seed"])]
                out.append(rows)
            seen[rank] = out
        except BaseException as err:  # noqa: BLE001  (re-raised in the test's thread)
            errors.append(err)
        finally:
            ranks[rank].close()

    threads = [threading.Thread(target=read, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    assert len(taken) == 2 * (epochs - 1)  # epochs 1 and 2 of each rank were started ahead
    for epoch in range(epochs):
        order = source.order(epoch)
        task_of_seed = {source.task_seed(epoch, t): t for t in range(n_rows // task_rows)}
        both = seen[0][epoch] + seen[1][epoch]
        assert sorted(i for i, _, _ in both) == list(range(n_rows))
        for idx, seed, _ in both:
            task = task_of_seed[seed]  # a KeyError: a row of another pass
            assert idx in order[task * task_rows:(task + 1) * task_rows]
        flags = [[last for _, _, last in seen[r][epoch]] for r in range(2)]
        assert flags[0] == flags[1] and flags[0][-1] and sum(flags[0]) == 4  # the last step's 4 rows
    assert not _threads()

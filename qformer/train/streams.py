"""The training streams of one worker: its shards of the Ray Datasets, read pass by pass from where the
checkpoint left them, drawn by ratio when several sources mix (LAVIS's MultiIterLoader).

Epoch-based runs read one fresh pass per epoch; iteration-based runs (`max_iters`) and mixed sources cycle
one endless stream per source across inner epochs (LAVIS's IterLoader). Each pass starts by telling the
stream's source, through the stream plan, which pass to read and what of it is already done
(qformer.data.position), so a resumed pass trains every row exactly once.

An epoch-based run starts the next epoch's pass as soon as this epoch's reading ends (the read-ahead saw
the stream's end, or the last counted step was read) and another epoch follows: Ray Data's per-pass start
then overlaps the last step, the epoch-end checkpoint and any evaluation (qformer.data.head_start). Its
first batch waits unobserved: the positions move to the new pass only when the epoch takes it over.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from qformer.config.batch_plan import BatchPlan
from qformer.core.logs import get_logger
from qformer.data.head_start import HeadStart
from qformer.data.position import PositionTracker, StreamPosition

log = get_logger("train")


class TrainingStreams:
    def __init__(self, run: Any, plan: BatchPlan, ratios: dict[str, float] | None, num_rows: dict[str, int],
                 stream_plan: Any, saved_positions: dict | None, rank: int) -> None:
        self.run, self.plan, self.ratios, self.num_rows = run, plan, ratios, num_rows
        self.stream_plan, self.rank = stream_plan, rank
        self.iter_based = bool(run.get("max_iters"))
        self.names = list(ratios) if ratios else ["train"]
        self.shards = {name: ray.train.get_dataset_shard(name) for name in self.names}
        saved = saved_positions or {}
        self.positions = {n: PositionTracker(StreamPosition.from_dict(saved.get(n))) for n in self.names}
        self.position_restored = bool(saved)
        self._endless: dict[str, Iterator[dict]] = {}
        self._next: dict[str, tuple[int, HeadStart]] = {}  # stream -> (pass, its start), epoch-based runs

    def steps_per_epoch(self) -> int | None:
        """Optimiser steps per (inner) epoch when known up front; None = until the shard is exhausted."""
        cap = self.run.get("max_steps_per_epoch")
        if self.iter_based:
            n = int(self.run.iters_per_inner_epoch)
        elif self.ratios:  # sources cycle, so an epoch is one pass over all rows in batches
            n = max(1, sum(int(self.num_rows.get(s, 0)) for s in self.names) // self.plan.samples_per_step)
        else:
            n = None
        if cap:
            n = int(cap) if n is None else min(n, int(cap))
        return n

    def expected_steps(self) -> int | None:
        """steps_per_epoch, else an estimate from the row count (for the progress bar)."""
        known = self.steps_per_epoch()
        return known if known is not None else (int(self.num_rows.get("train") or 0) // self.plan.samples_per_step
                                                or None)

    def steps(self, epoch: int, begin: int, start_next: bool = False) -> Iterator[tuple[list[dict], bool]]:
        """This epoch's optimiser steps from step `begin` on: each a list of micro-batches and whether it is
        the epoch's last. Where the epoch length is not known up front (one stream read to its end), the
        next step is read one ahead, so the last step is known when it is trained (its checkpoint is the
        epoch's end, not a step checkpoint followed by an end one); elsewhere the loop counts to the length
        and the flag stays False. A step's batches give up their position columns only when it is handed
        over, so a checkpoint never counts the step read ahead. `start_next`: another epoch follows in this
        run and an epoch-based stream starts its pass as soon as this epoch's reading ends."""
        pairs = self._batches(epoch, begin * self.plan.micro_per_step, start_next)
        if self.steps_per_epoch() is not None:  # cycling streams start passes while read: observe in order
            return ((group, False) for group in _grouped(self._observed(pairs), self.plan.micro_per_step))
        return self._looking_ahead(_grouped(pairs, self.plan.micro_per_step))

    def settled_positions(self) -> dict[str, dict]:
        """Every stream's position agreed over the ranks, for a checkpoint (a collective)."""
        return {n: t.settle(_gather_objects).to_dict() for n, t in self.positions.items()}

    def close(self) -> None:
        """Ends every open stream and any next pass started ahead (its thread too)."""
        for stream in self._endless.values():
            stream.close()
        while self._next:
            self._next.popitem()[1][1].close()

    def _observed(self, pairs: Iterator[tuple[str, dict]]) -> Iterator[dict]:
        for name, batch in pairs:
            self.positions[name].observe(batch)
            yield batch

    def _looking_ahead(self, groups: Iterator[list[tuple[str, dict]]]) -> Iterator[tuple[list[dict], bool]]:
        try:
            current = next(groups, None)
            while current is not None:
                upcoming = next(groups, None)
                yield list(self._observed(iter(current))), upcoming is None
                current = upcoming
        finally:
            groups.close()

    def _batches(self, epoch: int, begin: int, start_next: bool) -> Iterator[tuple[str, dict]]:
        if self.iter_based or self.ratios:
            if not self._endless:  # one endless stream per source, closed in close()
                first = {n: self.positions[n].position.pass_ if self.position_restored else epoch for n in self.names}
                self._endless = {n: self._endless_source(n, first[n]) for n in self.names}
            yield from self._draw(self._endless, epoch, begin)
            return
        iters = {n: self._open_pass(n, epoch) for n in self.names}
        try:
            if begin and not self.position_restored:  # a checkpoint from before data positions: skip by count
                log.info("resuming inside epoch %d: skipping %d batches of this epoch's data", epoch, begin)
                for _ in range(begin):
                    if next(iters["train"], None) is None:
                        return
            length = self.steps_per_epoch()
            last = None if length is None else length * self.plan.micro_per_step - 1  # counted: its last batch
            for i, item in enumerate(self._draw(iters, epoch, begin), start=begin):
                if i == last:  # this epoch reads no more: end the pass now, before its last step trains
                    self._end_pass(iters, epoch, start_next)
                    yield item
                    return
                yield item
        finally:  # close Ray's iterators now (an early stop, e.g. preemption, leaves them open)
            _close_all(iters)
        self._end_pass(iters, epoch, start_next)  # the stream ran out (seen one step ahead of the loop)

    def _end_pass(self, iters: dict[str, Iterator[dict]], epoch: int, start_next: bool) -> None:
        """This epoch's reading is over: its iterators closed (Ray's split coordinator lets a pass start only
        when every rank ended the last), then the next epoch's pass started ahead where there is one."""
        _close_all(iters)
        if not start_next:  # the run's last epoch (or a caller that cannot say): no useless execution
            return
        for name in self.names:
            planned = StreamPosition(epoch + 1).to_dict()  # what start_pass gives a pass not yet read
            self._next[name] = (epoch + 1, HeadStart(lambda name=name: self._pass_batches(name, planned)))

    def _open_pass(self, name: str, pass_: int) -> Iterator[dict]:
        """Pass `pass_` of stream `name`, read from where its position says: the one started ahead when it is
        that pass from its beginning, else a fresh start."""
        ahead, tracker = self._next.pop(name, None), self.positions[name]
        tracker.start_pass(pass_)  # a new pass forgets the old one's progress
        if ahead is not None:
            if ahead[0] == pass_ and tracker.position.to_dict() == StreamPosition(pass_).to_dict():
                return ahead[1].take()
            ahead[1].close()  # (not the pass this epoch reads: a caller that changed its mind)
        return self._pass_batches(name, tracker.position.to_dict())

    def _draw(self, iters: dict[str, Iterator[dict]], epoch: int, begin: int) -> Iterator[tuple[str, dict]]:
        """(stream name, micro-batch), its position columns still in it (see steps())."""
        i = begin
        while True:
            name = pick_stream(self.ratios, int(self.run.seed), epoch, i) if self.ratios else self.names[0]
            batch = next(iters[name], None)
            if batch is None:
                return
            yield name, batch
            i += 1

    def _endless_source(self, name: str, first_pass: int) -> Iterator[dict]:
        """Batches of stream `name`, every pass from `first_pass` on."""
        round_ = 0
        while True:
            pass_ = first_pass + round_
            tracker = self.positions[name]
            tracker.start_pass(pass_)  # a new pass forgets the old one's progress
            seen = False
            for batch in self._pass_batches(name, tracker.position.to_dict()):
                seen = True
                yield batch
            if not seen:
                raise RuntimeError(f"training dataset '{name}' yields no full batch of {self.plan.worker_batch} on "
                                   f"rank {self.rank}; lower run.batch_size_train or add data")
            round_ += 1


    def _pass_batches(self, name: str, position: dict) -> Iterator[dict]:
        """One pass of stream `name` as `position` (a StreamPosition's dict) plans it: written to the stream
        plan first (every rank writes the same; Ray plans the read after all have arrived), then read."""
        if self.stream_plan is not None:
            self.stream_plan.set(name, position)
        data, pass_ = self.run.data, int(position["pass"])
        buffer = int(data.shuffle_buffer or 0)
        return iter(self.shards[name].iter_torch_batches(
            batch_size=self.plan.worker_batch, drop_last=True, prefetch_batches=int(data.prefetch_batches),
            local_shuffle_buffer_size=buffer or None,
            local_shuffle_seed=(int(self.run.seed) * 1000 + pass_ * 31) if buffer else None,
            # Host batches, pinned on a GPU machine: the step plans the text on the host
            # (train.step.with_text_plan) and then copies non-blocking. Ray's default ("auto") would
            # move them to the worker's GPU first, and every micro-batch would then sync the host.
            device="cpu", pin_memory=torch.cuda.is_available(),
        ))


def _close_all(iters: dict[str, Iterator[dict]]) -> None:
    for it in iters.values():
        close = getattr(it, "close", None)
        if close is not None:
            close()


def pick_stream(ratios: dict[str, float], seed: int, epoch: int, i: int) -> str:
    """The training stream micro-batch `i` of `epoch` comes from, drawn by ratio (LAVIS's runner_iter
    MultiIterLoader). Seeded by (seed, epoch, i), so every rank draws the same without talking."""
    names = list(ratios)
    probs = np.array([ratios[n] for n in names], dtype=np.float64)
    rng = np.random.default_rng([seed, epoch, i])
    return names[int(rng.choice(len(names), p=probs / probs.sum()))]


def _gather_objects(obj: Any) -> list[Any]:
    """all_gather_object over the training ranks (just [obj] without a process group)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _grouped(batches: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive micro-batches, `size` at a time (one step's); an incomplete last group is dropped."""
    group: list[dict] = []
    try:
        for batch in batches:
            group.append(batch)
            if len(group) == size:
                yield group
                group = []
    finally:
        batches.close()

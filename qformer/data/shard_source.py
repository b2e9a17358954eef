"""Image-text shards (WebDataset tars, Parquet, JSONL/CSV manifests) as a per-pass shuffled Ray Data source.

What the driver holds is the list of shard names, never the samples: a 129M-pair set is ~130k names.
Each pass (epoch, or inner epoch of an iteration-based run) reads:
- the shards of part `pass % parts_per_epoch` (BLIP's "one part of LAION per epoch"; one part by default),
- in an order permuted by (run.seed, stream, pass),
- one read task per shard, skipping the tasks, chunks and rows the training state says are done
  (qformer.data.position); the pass comes from the training loop's `StreamPlan`, not from Ray.
A task streams its shard (qformer.data.shard_records: every readable sample kept, every lost one counted
by reason) through a seeded shuffle buffer of run.data.shard_shuffle_buffer samples, as webdataset and
OpenCLIP do, so its memory is bounded by the buffer, not by the shard; and hands the samples on in
chunks of a few batches (qformer.data.pipeline.shard_chunk_rows) with their `unit` columns. The buffer's
order is a function of the shard's bytes and the seed, so a resumed read reproduces it and the chunk and
row positions stay exact. The trade-off: samples mix within a window of the buffer, not across the whole
shard (shards are themselves re-ordered every pass).

A sample with several captions (CapFilt's kept captions) trains on one per pass: drawn by the chunk's
generator (the one its augmentation seed comes from: run.seed, stream, pass, task, chunk) at the row's
offset, so a resumed read, which leaves out rows, gives the rest the captions they had, and the next pass
draws again.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from qformer.data.position import ROW, UNIT, UNIT_ROWS, decode_unit, encode_unit, read_plan, unit_key
from qformer.data.shard_records import ShardReading, read_samples
from qformer.data.shard_set import ShardSet
from qformer.data.stats import record_losses
from qformer.data.transform import AUG_SEED

log = logging.getLogger("qformer.data")
ROW_SCHEMA = pa.schema([("path", pa.string()), ("data", pa.binary()), ("caption", pa.string()),
                        ("source", pa.int64()), (UNIT, pa.int64()), (ROW, pa.int64()), (UNIT_ROWS, pa.int64()),
                        (AUG_SEED, pa.int64())])


class ShardStream(Datasource):
    def __init__(self, shards: ShardSet, source: int, rows_per_chunk: int, seed: tuple[int, ...], plan=None,
                 stream: str | None = None, shuffle_buffer: int = 1000) -> None:
        self._set, self._source, self._rows = shards, int(source), max(1, int(rows_per_chunk))
        self._buffer = max(1, int(shuffle_buffer))
        self._seed, self._plan = tuple(int(s) for s in seed), plan
        self._stream = stream or shards.name  # the key in `plan`

    def get_name(self) -> str:
        return f"Shards[{self._set.name}]"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def order(self, pass_: int) -> np.ndarray:
        """Shard indices of pass `pass_`, in read order."""
        part = self._set.part(pass_)
        return part[np.random.default_rng((*self._seed, int(pass_))).permutation(len(part))]

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        position = read_plan(self._plan, self._stream)
        tasks = []
        for task, shard in enumerate(self.order(position.pass_)):
            if task in position.done_tasks:
                continue
            path = self._set.shards[int(shard)]
            # the task carries its own shard's name only: with the whole list every task would hold every
            # name, and the tasks Ray Data puts in the object store each pass would grow with shards squared
            trained = {u: frozenset(r) for u, r in position.partial.items() if decode_unit(u)[0] == task}
            read = partial(_read_task, replace(self._set, shards=(path,)), path, self._source, task, self._rows,
                           (*self._seed, position.pass_, task), frozenset(position.done_chunks.get(task, ())), trained,
                           self._buffer)
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[path])
            tasks.append(ReadTask(read, meta, schema=ROW_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks


def shard_dataset(shards: ShardSet, source: int, rows_per_chunk: int, seed: tuple[int, ...], *, plan=None,
                  stream: str | None = None, num_cpus: float | None = None, shuffle_buffer: int = 1000):
    """The shards as a Ray Dataset of (path, data, caption, source, unit, unit_rows, aug_seed) rows."""
    kwargs = {"num_cpus": float(num_cpus)} if num_cpus is not None else {}
    return ray.data.read_datasource(ShardStream(shards, source, rows_per_chunk, seed, plan, stream, shuffle_buffer),
                                    override_num_blocks=1, **kwargs)  # see epoch_rows: no block splits


# ---- inside a read task ------------------------------------------------------------------------------
def shuffled(samples: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A streaming shuffle: hold `size` samples, hand on a random one as each new one arrives, then the rest
    in random order. Deterministic for the same samples and generator."""
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(size))
        buffer[j], sample = sample, buffer[j]
        yield sample
    for j in rng.permutation(len(buffer)):
        yield buffer[int(j)]


def chunks(samples: Iterator, size: int) -> Iterator[tuple[int, list, bool]]:
    """(index, samples, last) per `size` samples; the last chunk is known by looking one sample ahead."""
    index, current, ready = 0, [], None
    for sample in samples:
        if ready is not None:
            yield index, ready, False
            index, ready = index + 1, None
        current.append(sample)
        if len(current) == size:
            ready, current = current, []
    if ready is not None:
        yield index, ready, not current
        index += 1
    if current:
        yield index, current, True


def _read_task(shards: ShardSet, path: str, source: int, task: int, rows_per_chunk: int, seed: tuple[int, ...],
               done_chunks: frozenset, trained: dict[int, frozenset] | None = None,
               shuffle_buffer: int = 1000) -> Iterator[pa.Table]:
    reading = ShardReading(path)
    losses = _ChunkLosses(reading)
    stream = shuffled(read_samples(shards, path, reading), shuffle_buffer, np.random.default_rng(seed))
    chunk = -1
    for chunk, part, last in chunks(stream, rows_per_chunk):
        rng = np.random.default_rng((*seed, chunk))
        unit, aug = encode_unit(task, chunk, last), int(rng.integers(2**62))
        losses.send(unit_key(aug, unit))  # also for chunks trained already: the same losses, under the same key
        if chunk in done_chunks:
            continue
        offsets = np.arange(len(part))
        if trained and unit in trained:  # a resumed pass: leave out the rows already trained on
            offsets = offsets[~np.isin(offsets, list(trained[unit]))]
        n = len(offsets)
        if not n:
            continue
        names, datas = zip(*(part[int(i)][:2] for i in offsets))
        captions = chosen_captions(part, offsets, rng)
        yield pa.table({
            "path": pa.array(names, pa.string()), "data": pa.array(datas, pa.binary()),
            "caption": pa.array(captions, pa.string()),
            "source": pa.array(np.full(n, source, np.int64)), UNIT: pa.array(np.full(n, unit, np.int64)),
            ROW: pa.array(offsets.astype(np.int64)), UNIT_ROWS: pa.array(np.full(n, n, np.int64)),
            AUG_SEED: pa.array(np.full(n, aug, np.int64)),
        }, schema=ROW_SCHEMA)
    if chunk < 0:  # nothing readable: the losses go under the unit the first chunk would have been
        losses.send(unit_key(int(np.random.default_rng((*seed, 0)).integers(2**62)), encode_unit(task, 0, True)))
    if reading.lost or reading.damage:
        log.warning("shard %s%s", reading.summary(), f"; first: {reading.messages[0]}" if reading.messages else "")


def chosen_captions(part: list, offsets: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Each row's caption; a tuple of captions gives the one `rng`'s draw for the row's offset in the chunk
    picks (drawn for every row, so the pick does not depend on which rows a resumed read leaves out)."""
    if not any(isinstance(sample[2], tuple) for sample in part):
        return [part[int(i)][2] for i in offsets]  # single captions: nothing drawn
    draws = rng.random(len(part))
    return [c if isinstance(c, str) else c[int(draws[i] * len(c))] for i, c in ((int(i), part[int(i)][2]) for i in offsets)]


class _ChunkLosses:
    """Each chunk's share of the shard's losses: what was lost while reading up to it (the last chunk is
    handed on only once the shard has been read to its end, so it takes what came after)."""

    def __init__(self, reading: ShardReading) -> None:
        self.reading, self.sent = reading, {}

    def send(self, unit: str) -> None:
        lost = self.reading.lost
        new = {r: n - self.sent.get(r, 0) for r, n in lost.items() if n > self.sent.get(r, 0)}
        if new:
            record_losses(new, unit)
            self.sent = dict(lost)

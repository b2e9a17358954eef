"""Image-text shards (WebDataset tars, Parquet, JSONL/CSV manifests) as a per-pass shuffled Ray Data source.

What the driver holds is the list of shard names, never the samples: a 129M-pair set is ~130k names.
Each pass (epoch, or inner epoch of an iteration-based run) reads:
- the shards of part `pass % parts_per_epoch` (BLIP's "one part of LAION per epoch"; one part by default),
- in an order permuted by (run.seed, stream, pass),
- one read task per shard, skipping the tasks, chunks and rows the training state says are done
  (qformer.data.position); the pass comes from the training loop's `StreamPlan`, not from Ray.
A task reads its shard with Ray Data's own reader for the format (WebDataset, JSON, CSV; Parquet with
pyarrow's, which Ray's calls after sampling each file), inside the task, so the planning process never
fetches per-shard metadata; shuffles the shard's rows (a bounded local shuffle: one
shard), and hands them on in chunks of run.data.task_rows rows with their `unit` columns. Records
with an empty or non-text caption, or without an image, are dropped and counted as skipped images,
as are undecodable images later; a truncated or unreadable shard keeps the samples read before the
damage and counts one skipped image for the rest, and the run goes on.
"""
from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data._internal.datasource.csv_datasource import CSVDatasource
from ray.data._internal.datasource.json_datasource import ArrowJSONDatasource
from ray.data._internal.datasource.webdataset_datasource import WebDatasetDatasource
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from qformer.data.position import ROW, UNIT, UNIT_ROWS, decode_unit, encode_unit, read_plan
from qformer.data.shard_set import WDS_IMAGE_EXTS, ShardSet
from qformer.data.stats import record_skipped
from qformer.data.storage import filesystem, join

ROW_SCHEMA = pa.schema([("path", pa.string()), ("data", pa.binary()), ("caption", pa.string()),
                        ("source", pa.int64()), (UNIT, pa.int64()), (ROW, pa.int64()), (UNIT_ROWS, pa.int64()),
                        ("aug_seed", pa.int64())])


class ShardStream(Datasource):
    def __init__(self, shards: ShardSet, source: int, rows_per_chunk: int, seed: tuple[int, ...], plan=None,
                 stream: str | None = None) -> None:
        self._set, self._source, self._rows = shards, int(source), max(1, int(rows_per_chunk))
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
                           (*self._seed, position.pass_, task), frozenset(position.done_chunks.get(task, ())), trained)
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[path])
            tasks.append(ReadTask(read, meta, schema=ROW_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks


def shard_dataset(shards: ShardSet, source: int, rows_per_chunk: int, seed: tuple[int, ...], *, plan=None,
                  stream: str | None = None, num_cpus: float | None = None):
    """The shards as a Ray Dataset of (path, data, caption, source, unit, unit_rows, aug_seed) rows."""
    kwargs = {"num_cpus": float(num_cpus)} if num_cpus is not None else {}
    return ray.data.read_datasource(ShardStream(shards, source, rows_per_chunk, seed, plan, stream),
                                    override_num_blocks=1, **kwargs)  # see epoch_rows: no block splits


# ---- inside a read task ------------------------------------------------------------------------------
def _read_task(shards: ShardSet, path: str, source: int, task: int, rows_per_chunk: int, seed: tuple[int, ...],
               done_chunks: frozenset, trained: dict[int, frozenset] | None = None) -> Iterator[pa.Table]:
    skipped: list[str] = []
    records = list(read_records(shards, path, skipped))
    record_skipped(skipped)
    if not records:
        return
    table = pa.concat_tables(records)
    rng = np.random.default_rng(seed)
    table = table.take(pa.array(rng.permutation(table.num_rows)))  # local shuffle: within the shard
    chunks = range(0, table.num_rows, rows_per_chunk)
    for chunk, start in enumerate(chunks):
        if chunk in done_chunks:
            continue
        part = table.slice(start, rows_per_chunk)
        unit = encode_unit(task, chunk, chunk == len(chunks) - 1)
        offsets = np.arange(part.num_rows)
        if trained and unit in trained:  # a resumed pass: leave out the rows already trained on
            offsets = offsets[~np.isin(offsets, list(trained[unit]))]
            part = part.take(pa.array(offsets))
        n = part.num_rows
        if not n:
            continue
        aug = int(np.random.default_rng((*seed, chunk)).integers(2**62))
        yield pa.table({
            "path": part["path"], "data": part["data"], "caption": part["caption"],
            "source": pa.array(np.full(n, source, np.int64)), UNIT: pa.array(np.full(n, unit, np.int64)),
            ROW: pa.array(offsets.astype(np.int64)), UNIT_ROWS: pa.array(np.full(n, n, np.int64)),
            "aug_seed": pa.array(np.full(n, aug, np.int64)),
        }, schema=ROW_SCHEMA)


def _ray_source(shards: ShardSet, path: str):
    """Ray Data's own reader for one shard."""
    fs, inner = filesystem(path, shards.endpoint)
    if shards.format == "wds":
        return WebDatasetDatasource([inner], decoder=None, filesystem=fs)
    if shards.format == "jsonl":
        return ArrowJSONDatasource([inner], filesystem=fs, partitioning=None)
    return CSVDatasource([inner], filesystem=fs, partitioning=None)


def _parquet_batches(shards: ShardSet, path: str) -> Iterator[pa.RecordBatch]:
    """pyarrow's reader, which Ray's uses too (Ray's also samples every file to estimate its size in memory)."""
    fs, inner = filesystem(path, shards.endpoint)
    with fs.open_input_file(inner) as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=1024)


def _blocks(shards: ShardSet, path: str) -> Iterator:
    if shards.format == "parquet":
        yield from _parquet_batches(shards, path)
        return
    for task in _ray_source(shards, path).get_read_tasks(1):
        yield from task()


def read_records(shards: ShardSet, path: str, skipped: list[str]) -> Iterator[pa.Table]:
    """One shard's usable (path, data, caption) records; what is unusable goes to `skipped` with why."""
    got = 0
    try:
        for block in _blocks(shards, path):
            frame = block.to_pandas() if isinstance(block, pa.RecordBatch) else BlockAccessor.for_block(block).to_pandas()
            records = _normalise(frame, shards, path, skipped)
            got += records.num_rows
            yield records
    except Exception as err:  # noqa: BLE001 - a damaged shard costs its remaining samples, not the run
        skipped.append(f"{path}: shard unreadable after {got} samples ({type(err).__name__}: {err})")


def _text(value) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) and value.strip() else None


def _normalise(df, shards: ShardSet, path: str, skipped: list[str]) -> pa.Table:
    paths, datas, captions = [], [], []
    fmt, text_key, image_key = shards.format, shards.text_key, shards.image_key
    root = shards.image_root
    for i, row in enumerate(df.to_dict("records")):
        name = f"{path}#{row.get('__key__', i)}"
        caption = _text(row.get(text_key))
        if caption is None and fmt == "wds" and row.get("json") is not None:
            try:
                meta = json.loads(row["json"]) if isinstance(row["json"], (bytes, str)) else row["json"]
                caption = _text(meta.get("caption")) if isinstance(meta, dict) else None
            except ValueError:
                caption = None
        if caption is None:
            skipped.append(f"{name}: empty or non-text caption ({text_key})")
            continue
        if fmt == "wds":
            keys = [image_key] if image_key else WDS_IMAGE_EXTS
            data = next((row[k] for k in keys if isinstance(row.get(k), bytes)), None)
            if data is None:
                skipped.append(f"{name}: no image member ({', '.join(keys)})")
                continue
            paths.append(name)
            datas.append(data)
        else:
            value = row.get(image_key)
            if isinstance(value, (bytes, bytearray)):
                paths.append(name)
                datas.append(bytes(value))
            elif isinstance(value, str) and value:
                paths.append(join(root, value) if root else value)
                datas.append(None)
            else:
                skipped.append(f"{name}: no image in column '{image_key}'")
                continue
        captions.append(caption)
    return pa.table({"path": pa.array(paths, pa.string()), "data": pa.array(datas, pa.binary()),
                     "caption": pa.array(captions, pa.string())})

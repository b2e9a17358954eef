"""CapFilt's shards: the input read into rows for the Ray pipeline, the output written one shard per input shard.

Input: any shard set the platform reads (qformer.data.shard_records), with samples that have an image but
no usable caption kept (their caption is scored out, not their image). A read task reads one shard and
hands its samples on in chunks of rows; the last chunk's rows carry the shard's sample count (`total`)
and what reading lost, so the driver knows when a shard's rows are all back. A shard with no readable
sample sends one row with index -1 instead, so it is written (empty) and not read again.

Output: the input's format (CSV manifests become JSONL: a list of captions has no CSV column) with the
format's default keys, under the input's file name: WebDataset `<key>.<image ext>`, `<key>.txt` (the
original caption) and `<key>.json` ({"caption", "captions", "scores", "original_kept"}); Parquet columns key,
caption, jpg (the image bytes, or its path), captions, scores; JSONL {"image" (path), "caption", "captions",
"scores"}. Beside each, `<name>_stats.json` (the shard's ranking.ShardStats, and img2dataset's
`successes`) is written first, then the shard, each atomically (a local file by rename, an object by its
upload completing), so a shard that exists is complete and a rerun skips it.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np

from qformer.data.capfilt.ranking import Kept, ShardStats
from qformer.data.capfilt.sampling import sample_seed
from qformer.data.shard_records import ShardReading, read_samples
from qformer.data.shard_set import ShardSet
from qformer.data.shard_source import chunks
from qformer.data.storage import join, missing, read_bytes, write_bytes
from qformer.data.tar_stream import tar_bytes

CHUNK_ROWS = 64  # rows a read task hands on at a time
_OUT_SUFFIX = {"csv": ".jsonl"}


def output_name(path: str, fmt: str) -> str:
    base = posixpath.basename(str(path))
    suffix = _OUT_SUFFIX.get(fmt)
    return base.rsplit(".", 1)[0] + suffix if suffix else base


def stats_name(output: str) -> str:
    return output.rsplit(".", 1)[0] + "_stats.json"


def written(out_dir: str, names: list[str], endpoint: str | None = None) -> set[str]:
    """The output shard names already in `out_dir` (one listing per folder)."""
    targets = [join(out_dir, n) for n in names]
    absent = set(missing(targets, endpoint))
    return {n for n, t in zip(names, targets) if t not in absent}


def read_rows(batch: dict[str, np.ndarray], shards: ShardSet, seed: int,
              chunk_rows: int = CHUNK_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: the shards named by index in batch["shard"] -> their samples as rows, in chunks."""
    for shard in batch["shard"]:
        path = shards.shards[int(shard)]
        reading, base = ShardReading(path), posixpath.basename(path)
        samples = read_samples(replace(shards, shards=(path,)), path, reading, captionless=True)
        done = 0
        for _, part, last in chunks(samples, chunk_rows):
            index = np.arange(done, done + len(part), dtype=np.int64)
            done += len(part)
            yield _rows(int(shard), index, part, [sample_seed(seed, base, i) for i in index],
                        done if last else -1, reading.lost if last else {})
        if not done:  # nothing readable: one row says so, and what was lost
            yield _rows(int(shard), np.asarray([-1], np.int64), [(path, b"", None)], [0], 0, reading.lost)


def _rows(shard: int, index: np.ndarray, part: list, seeds: list[int], total: int, lost) -> dict[str, np.ndarray]:
    n = len(part)
    originals = [json.dumps([] if c is None else [c] if isinstance(c, str) else list(c)) for _, _, c in part]
    return {"shard": np.full(n, shard, np.int64), "index": index, "name": np.asarray([s[0] for s in part], object),
            "data": np.asarray([s[1] or b"" for s in part], object), "originals": np.asarray(originals, object),
            "seed": np.asarray(seeds, np.int64), "total": np.full(n, total, np.int64),
            "lost": np.full(n, json.dumps(dict(lost)), object)}


@dataclass
class OutSample:
    name: str  # "<shard>#<key>" or an image path
    data: bytes  # the encoded image (b"": the image is at `name`)
    originals: list[str]
    kept: Kept | None  # None: the image did not decode (written with its originals only)

    @property
    def key(self) -> str:
        return self.name.rpartition("#")[2] if "#" in self.name else posixpath.basename(self.name).rsplit(".", 1)[0]

    @property
    def captions(self) -> list[str]:
        return self.kept.captions if self.kept is not None else self.originals

    def fields(self) -> dict:
        return {"caption": self.originals[0] if self.originals else None, "captions": self.captions,
                "scores": self.kept.scores if self.kept is not None else [],
                "original_kept": self.kept.original_kept if self.kept is not None else None}


def shard_bytes(fmt: str, samples: list[OutSample]) -> bytes:
    """One output shard, encoded."""
    if fmt == "wds":
        return _tar(samples)
    if fmt == "parquet":
        return _parquet(samples)
    return "".join(json.dumps({"image": s.name, **s.fields()}) + "\n" for s in samples).encode()


def _image_ext(data: bytes) -> str:
    if data[:4] == b"\x89PNG":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def _tar(samples: list[OutSample]) -> bytes:
    members = []
    for s in samples:
        meta = {"key": posixpath.basename(s.key), **s.fields()}
        members += [(f"{s.key}.{_image_ext(s.data)}", s.data)] if s.data else []
        members += [(f"{s.key}.txt", s.originals[0].encode())] if s.originals else []
        members.append((f"{s.key}.json", json.dumps(meta).encode()))
    return tar_bytes(members)


def _parquet(samples: list[OutSample]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_path = any(not s.data for s in samples)
    table = pa.table({
        "key": pa.array([s.key for s in samples], pa.string()),
        "caption": pa.array([s.originals[0] if s.originals else None for s in samples], pa.string()),
        "jpg": pa.array([s.name for s in samples], pa.string()) if by_path else
        pa.array([s.data for s in samples], pa.binary()),
        "captions": pa.array([s.captions for s in samples], pa.list_(pa.string())),
        "scores": pa.array([s.fields()["scores"] for s in samples], pa.list_(pa.float64())),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_output(out_dir: str, name: str, fmt: str, samples: list[OutSample], stats: ShardStats,
                 endpoint: str | None = None) -> None:
    """The stats file, then the shard (its presence is what marks the input shard done)."""
    record = {"successes": stats.samples, "capfilt": stats.to_dict()}
    write_bytes(join(out_dir, stats_name(name)), json.dumps(record).encode(), endpoint)  # whole or not at all
    write_bytes(join(out_dir, name), shard_bytes("jsonl" if fmt == "csv" else fmt, samples), endpoint)


def read_stats(out_dir: str, name: str, endpoint: str | None = None) -> ShardStats:
    return ShardStats.from_dict(json.loads(read_bytes(join(out_dir, stats_name(name)), endpoint))["capfilt"])

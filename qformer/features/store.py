"""On-disk layout of a feature cache and the low-level shard/index I/O.

A cache directory holds:

    manifest.json              settings that produced it (see manifest.py), views, counts
    images.parquet             image -> (shard, row): one row per cached image
    records/<source>.parquet   one row per training record: shard, row, text_ids, text_atts
    shards/part-*.npy          float16 [n_images, views, N, D] (frozen-ViT output before ln_vision)

Shards are plain .npy files so a reader can memory-map them and copy out only the one view it
needs; they are written to a temporary name and renamed, so a retried Ray task never leaves a
half-written shard behind, and an index row only ever points at a complete file.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
IMAGES = "images.parquet"
RECORDS_DIR = "records"
SHARDS_DIR = "shards"
FORMAT_VERSION = 1


def write_shard(cache_dir: str | Path, features: np.ndarray, first_index: int) -> str:
    """Atomically write one fp16 shard; returns its name relative to the shards dir."""
    if features.ndim != 4:
        raise ValueError(f"shard features must be [images, views, N, D], got shape {features.shape}")
    shard_dir = Path(cache_dir) / SHARDS_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    # The uuid keeps a retried task from colliding with (or truncating) an earlier attempt's file.
    name = f"part-{first_index:09d}-{uuid.uuid4().hex[:8]}.npy"
    tmp = shard_dir / (name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(features, dtype=np.float16))
    os.replace(tmp, shard_dir / name)
    return name


class ShardReader:
    """Memory-maps shards lazily (one handle per shard, kept for the reader's lifetime)."""

    def __init__(self, cache_dir: str | Path):
        self.shard_dir = Path(cache_dir) / SHARDS_DIR
        self._open: dict[str, np.ndarray] = {}

    def shard(self, name: str) -> np.ndarray:
        arr = self._open.get(name)
        if arr is None:
            path = self.shard_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"feature cache shard missing: {path} (is the cache directory complete?)")
            arr = np.load(path, mmap_mode="r")
            self._open[name] = arr
        return arr

    def gather(self, shards: np.ndarray, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Features [B, N, D] fp16 for (shard[i], row[i], view[i]), in input order."""
        out: np.ndarray | None = None
        for i, (name, row, view) in enumerate(zip(shards, rows, views)):
            feat = self.shard(str(name))[int(row), int(view)]
            if out is None:
                out = np.empty((len(rows), *feat.shape), dtype=np.float16)
            out[i] = feat
        if out is None:
            raise ValueError("gather() needs at least one row")
        return out


def write_images_index(cache_dir: str | Path, image_keys: list[str], shards: list[str], rows: list[int]) -> None:
    table = pa.table({"image": pa.array(image_keys, pa.string()),
                      "shard": pa.array(shards, pa.string()),
                      "row": pa.array(rows, pa.int32())})
    pq.write_table(table, Path(cache_dir) / IMAGES)


def read_images_index(cache_dir: str | Path) -> dict[str, tuple[str, int]]:
    path = Path(cache_dir) / IMAGES
    if not path.is_file():
        raise FileNotFoundError(f"feature cache index missing: {path}")
    table = pq.read_table(path)
    return {k: (s, int(r)) for k, s, r in zip(table["image"].to_pylist(), table["shard"].to_pylist(),
                                              table["row"].to_pylist())}


def write_records(cache_dir: str | Path, source: str, shards: list[str], rows: list[int],
                  text_ids: np.ndarray, text_atts: np.ndarray) -> Path:
    """One source's training records; token ids stored as int32 and masks as int8 to keep the table small."""
    if not (len(shards) == len(rows) == len(text_ids) == len(text_atts)):
        raise ValueError("records columns must have equal lengths")
    length = text_ids.shape[1] if len(text_ids) else 0
    table = pa.table({
        "shard": pa.array(shards, pa.string()),
        "row": pa.array(rows, pa.int32()),
        "text_ids": pa.FixedSizeListArray.from_arrays(pa.array(text_ids.astype(np.int32).ravel()), length),
        "text_atts": pa.FixedSizeListArray.from_arrays(pa.array(text_atts.astype(np.int8).ravel()), length),
    })
    out = Path(cache_dir) / RECORDS_DIR / f"{source}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out


def read_records(cache_dir: str | Path, source: str) -> pa.Table:
    path = Path(cache_dir) / RECORDS_DIR / f"{source}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"feature cache records missing for source '{source}': {path}")
    return pq.read_table(path)


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, dtype=np.int64) -> np.ndarray:
    """A FixedSizeList column -> 2-D array (no Python objects per row)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, width)

"""The synthetic shapes pairs (qformer.data.synth) as image-text shards, in each format the platform reads.

Laid out as the tools people use write them, so every path can be tried offline:
- wds: `shards/{00000..}.tar` holding `<key>.jpg`, `<key>.txt` (caption) and `<key>.json`
  ({"key", "caption"}), with img2dataset's `<shard>_stats.json` ({"successes": n}) beside each tar;
- parquet: `shards/{00000..}.parquet` with img2dataset's parquet columns key, caption, jpg (bytes);
- jsonl / csv: `shards/{00000..}.jsonl|csv` manifests of (image, caption), the images under
  `shards/images/` and the manifest's `image` column relative to the manifest's folder.
Keys are `<shard:05d><index:04d>`, unique over the set. Same seed -> the same pictures and captions.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qformer.data.synth import captions, render, sample_scene
from qformer.data.tar_stream import tar_bytes

FORMAT_SUFFIX = {"wds": "tar", "parquet": "parquet", "jsonl": "jsonl", "csv": "csv"}


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(out: str | Path, fmt: str, shards: int = 4, per_shard: int = 64, seed: int = 0,
                 image_size: int = 96) -> dict:
    """Write `shards` shards of `per_shard` pairs under `out/shards`; returns what a config needs."""
    if fmt not in FORMAT_SUFFIX:
        raise ValueError(f"format must be one of {', '.join(FORMAT_SUFFIX)}, got {fmt!r}")
    folder = Path(out) / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = FORMAT_SUFFIX[fmt]
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            scene = sample_scene(rng)
            samples.append((f"{s:05d}{i:04d}", _jpeg(render(scene, image_size, rng)), captions(scene, 1, rng)[0]))
        _WRITERS[fmt](folder / f"{s:05d}.{suffix}", samples)
    pattern = str(folder / f"{{00000..{shards - 1:05d}}}.{suffix}")
    return {"storage": pattern, "format": fmt, "num_samples": shards * per_shard, "folder": str(folder)}


def _write_wds(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    path.write_bytes(tar_bytes((name, data) for key, jpg, caption in samples
                               for name, data in ((f"{key}.jpg", jpg), (f"{key}.txt", caption.encode()),
                                                  (f"{key}.json", json.dumps({"key": key, "caption": caption}).encode()))))
    stats = path.with_name(f"{path.stem}_stats.json")
    stats.write_text(json.dumps({"count": len(samples), "successes": len(samples), "failed_to_download": 0}))


def _write_parquet(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    keys, jpgs, caps = zip(*samples)
    pq.write_table(pa.table({"key": list(keys), "caption": list(caps), "jpg": pa.array(jpgs, pa.binary())}), path)


def _manifest_images(path: Path, samples: list[tuple[str, bytes, str]]) -> list[tuple[str, str]]:
    images = path.parent / "images"
    images.mkdir(exist_ok=True)
    rows = []
    for key, jpg, caption in samples:
        (images / f"{key}.jpg").write_bytes(jpg)
        rows.append((f"images/{key}.jpg", caption))
    return rows


def _write_jsonl(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    with open(path, "w") as f:
        for image, caption in _manifest_images(path, samples):
            f.write(json.dumps({"image": image, "caption": caption}) + "\n")


def _write_csv(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(_manifest_images(path, samples))


_WRITERS = {"wds": _write_wds, "parquet": _write_parquet, "jsonl": _write_jsonl, "csv": _write_csv}


def write_shard(path: str | Path, fmt: str, samples: list[tuple[str, bytes, str]]) -> None:
    """One shard of (key, encoded image, caption) samples in `fmt`, laid out as `write_shards` lays them."""
    _WRITERS[fmt](Path(path), samples)

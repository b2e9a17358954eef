"""Samples with several captions (what `qformer data capfilt` writes): read from each format, one drawn per
pass by the read task, the same after a resume, and reported by `qformer data check` (no Ray)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qformer.data.shard_check import format_shard_report, shard_report
from qformer.data.shard_records import ShardReading, read_samples
from qformer.data.shard_set import DEFAULT_KEYS, ShardSet
from qformer.data.shard_source import _read_task
from qformer.data.synth_shards import write_shards
from qformer.data.transform import AUG_SEED


def _set(path: Path, fmt: str) -> ShardSet:
    return ShardSet("s", fmt, (str(path),), *DEFAULT_KEYS[fmt])


def _read(path: Path, fmt: str, captionless: bool = False) -> tuple[list, ShardReading]:
    reading = ShardReading(str(path))
    return list(read_samples(_set(path, fmt), str(path), reading, captionless=captionless)), reading


def _multi_tar(path: Path, n: int = 12) -> list[tuple[str, ...]]:
    """n samples: even ones with 2 captions in the json (and a .txt the list wins over), odd ones with one."""
    caps = [(f"cat {i}", f"dog {i}") if i % 2 == 0 else (f"bird {i}",) for i in range(n)]
    with tarfile.open(path, "w") as tar:
        for i, c in enumerate(caps):
            meta = {"caption": "web", "captions": list(c)} if len(c) > 1 else {"caption": c[0]}
            txt = b"web" if len(c) > 1 else c[0].encode()
            for name, data in ((f"{i:04d}.jpg", b"\xff\xd8jpeg"), (f"{i:04d}.txt", txt),
                               (f"{i:04d}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return caps


def test_each_format_reads_a_caption_list_and_single_captions_stay_strings(tmp_path: Path) -> None:
    caps = _multi_tar(tmp_path / "a.tar")
    samples, reading = _read(tmp_path / "a.tar", "wds")
    assert [s[2] for s in samples] == [c if len(c) > 1 else c[0] for c in caps]
    assert (reading.kept, reading.multi, reading.captions) == (12, 6, 18)
    pq.write_table(pa.table({"key": ["k0", "k1", "k2"], "caption": ["web", "one", None],
                             "jpg": pa.array([b"x", b"y", b"z"], pa.binary()),
                             "captions": pa.array([["p", "q"], ["one"], ["", "  "]], pa.list_(pa.string()))}),
                   tmp_path / "b.parquet")
    samples, reading = _read(tmp_path / "b.parquet", "parquet")
    assert [s[2] for s in samples] == [("p", "q"), "one"] and reading.lost["no_caption"] == 1  # no usable caption
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "/i/0.jpg", "caption": ["u", "v", "w"]}) + "\n" +
                                      json.dumps({"image": "/i/1.jpg", "caption": "plain"}) + "\n")
    assert [s[2] for s in _read(tmp_path / "c.jsonl", "jsonl")[0]] == [("u", "v", "w"), "plain"]


def test_captionless_reading_keeps_images_without_a_caption(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "/i/0.jpg", "caption": ""}) + "\n")
    assert _read(tmp_path / "m.jsonl", "jsonl")[1].lost["no_caption"] == 1
    samples, reading = _read(tmp_path / "m.jsonl", "jsonl", captionless=True)
    assert samples == [("/i/0.jpg", None, None)] and not reading.lost


def _table(path: Path, seed: tuple, **kw):
    tables = list(_read_task(_set(path, "wds"), str(path), 0, 0, 4, seed, frozenset(), **kw))
    return pa.concat_tables(tables).to_pydict()


def test_one_caption_is_drawn_per_pass_seeded_and_the_same_after_a_resume(tmp_path: Path) -> None:
    caps = _multi_tar(tmp_path / "a.tar", 40)
    by_key = {f"{tmp_path}/a.tar#{i:04d}": c for i, c in enumerate(caps)}
    first = _table(tmp_path / "a.tar", (0, 0, 0, 0), shuffle_buffer=8)
    assert first == _table(tmp_path / "a.tar", (0, 0, 0, 0), shuffle_buffer=8)  # seeded: reproducible
    assert all(c in by_key[p] for p, c in zip(first["path"], first["caption"]))  # one of the sample's own
    picks = {p: set() for p, c in by_key.items() if len(c) > 1}
    for pass_ in range(6):
        table = _table(tmp_path / "a.tar", (0, 0, pass_, 0), shuffle_buffer=8)
        for p, c in zip(table["path"], table["caption"]):
            picks.get(p, set()).add(c)
    assert all(len(seen) == 2 for seen in picks.values())  # over passes, both captions of every sample
    # a resumed read: chunk 0 done, rows 0 and 2 of chunk 1 (unit 2) trained; the rest keep their captions
    resumed = list(_read_task(_set(tmp_path / "a.tar", "wds"), str(tmp_path / "a.tar"), 0, 0, 4, (0, 0, 0, 0),
                              frozenset({0}), {2: frozenset({0, 2})}, shuffle_buffer=8))
    again = pa.concat_tables(resumed).to_pydict()
    assert len(again["path"]) == 40 - 4 - 2
    chosen = dict(zip(first["path"], first["caption"]))
    assert all(chosen[p] == c for p, c in zip(again["path"], again["caption"]))


def test_single_caption_shards_read_as_before(tmp_path: Path) -> None:
    """No draw where no sample has several captions: captions and augmentation seeds as the read always gave."""
    info = write_shards(tmp_path, "wds", shards=1, per_shard=10, seed=1, image_size=16)
    path = Path(info["folder"]) / "00000.tar"
    table = _table(path, (3, 0, 1, 0), shuffle_buffer=4)
    samples, _ = _read(path, "wds")
    assert sorted(table["caption"]) == sorted(s[2] for s in samples)
    expected = [int(np.random.default_rng((3, 0, 1, 0, chunk)).integers(2**62)) for chunk in (0, 1, 2)]
    assert sorted(set(table[AUG_SEED])) == sorted(expected)


def test_data_check_reports_samples_with_several_captions(tmp_path: Path) -> None:
    _multi_tar(tmp_path / "00000.tar")
    shards = _set(tmp_path / "00000.tar", "wds")
    report = shard_report("web", shards, str(tmp_path / "00000.tar"))
    assert (report.readable, report.multi, report.captions) == (12, 6, 18)
    text = "\n".join(format_shard_report(report))
    assert "captions 18 (1.50 a sample): 6 samples with several" in text

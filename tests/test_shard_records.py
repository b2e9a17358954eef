"""Reading one shard: every readable sample kept, every lost one counted by reason (no Ray).

Real files: tars, manifests and Parquet written by `qformer data synth`'s shard writer, then damaged,
re-ordered or edited here the way crawls and interrupted copies damage them.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from qformer.data.shard_records import ShardReading, read_samples
from qformer.data.shard_set import DEFAULT_KEYS, ShardSet
from qformer.data.shard_source import chunks, shuffled
from qformer.data.synth_shards import write_shards


def _set(path: Path, fmt: str, image_root: str | None = None) -> ShardSet:
    text_key, image_key = DEFAULT_KEYS[fmt]
    return ShardSet("s", fmt, (str(path),), text_key, image_key, image_root)


def _read(path: Path, fmt: str = "wds", image_root: str | None = None) -> tuple[list, ShardReading]:
    reading = ShardReading(str(path))
    return list(read_samples(_set(path, fmt, image_root), str(path), reading)), reading


def _members(path: Path) -> list[tuple[str, bytes, int, int]]:
    """(name, data, header offset, data offset) of each member, read with the standard library."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read(), m.offset, m.offset_data) for m in tar.getmembers()]


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tar600(tmp_path_factory) -> Path:
    """One 600-sample tar (img2dataset layout: jpg, txt, json per key, `_stats.json` beside it)."""
    info = write_shards(tmp_path_factory.mktemp("tar600"), "wds", shards=1, per_shard=600, seed=7, image_size=16)
    return Path(info["folder"]) / "00000.tar"


@pytest.mark.parametrize("k", [1, 26, 300, 513, 600])
def test_a_tar_cut_inside_sample_k_keeps_the_samples_before_it(tar600: Path, tmp_path: Path, k: int) -> None:
    members = _members(tar600)
    _, jpg, _, start = members[3 * (k - 1)]  # sample k's first member
    cut = tmp_path / "00000.tar"
    cut.write_bytes(tar600.read_bytes()[: start + len(jpg) // 2])
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 600}))
    samples, reading = _read(cut)
    expected = [m[1].decode() for m in members if m[0].endswith(".txt")][: k - 1]
    assert [caption for _, _, caption in samples] == expected
    assert reading.kept == k - 1 and dict(reading.lost) == {"damaged_shard": 600 - (k - 1)}
    assert f"the file ends inside member 00000{k - 1:04d}.jpg" in reading.damage  # the member cut is named
    assert reading.summary().startswith(f"{cut}: {k - 1} samples kept; {601 - k} lost")


def test_without_metadata_the_damage_counts_at_least_the_sample_it_cut(tar600: Path, tmp_path: Path) -> None:
    members = _members(tar600)
    cut = tmp_path / "00000.tar"
    cut.write_bytes(tar600.read_bytes()[: members[30][3] + 10])  # inside sample 11's jpg; no _stats.json
    samples, reading = _read(cut)
    assert len(samples) == 10 and dict(reading.lost) == {"damaged_shard": 1} and reading.expected is None


def test_a_tar_cut_between_members_is_damage_too(tar600: Path, tmp_path: Path) -> None:
    members = _members(tar600)
    cut = tmp_path / "00000.tar"
    cut.write_bytes(tar600.read_bytes()[: members[3 * 40 + 1][2]])  # at sample 41's .txt header: it has no caption
    samples, reading = _read(cut)
    assert len(samples) == 40 and "without the end-of-archive blocks" in reading.damage and reading.lost_total == 1


def test_garbage_in_the_middle_is_damage_not_a_quiet_end(tar600: Path, tmp_path: Path) -> None:
    """The standard library's streaming mode ends at an invalid header without a word; here it is damage."""
    members = _members(tar600)
    data = bytearray(tar600.read_bytes())
    header = members[3 * 99][2]  # sample 100's first header
    data[header:header + 2048] = np.random.default_rng(0).integers(1, 255, 2048, dtype=np.uint8).tobytes()
    bad = tmp_path / "00000.tar"
    bad.write_bytes(bytes(data))
    samples, reading = _read(bad)
    assert len(samples) == 99 and "not a tar member header" in reading.damage
    assert f"damaged at byte {header}" in reading.damage and reading.lost_total == 1


def test_members_out_of_order_duplicated_and_upper_case_all_train(tmp_path: Path) -> None:
    info = write_shards(tmp_path / "w", "wds", shards=1, per_shard=6, seed=2, image_size=16)
    members = [(name, data) for name, data, _, _ in _members(Path(info["folder"]) / "00000.tar")]
    rng = np.random.default_rng(1)
    shuffled_members = [members[int(i)] for i in rng.permutation(len(members))]  # no two of a key side by side
    upper = [(n.replace(".jpg", ".JPG").replace(".txt", ".TXT"), d) for n, d in shuffled_members]
    duplicated = upper[:4] + [upper[2]] + upper[4:]
    _write_tar(tmp_path / "odd.tar", duplicated)
    samples, reading = _read(tmp_path / "odd.tar")
    captions = {data.decode() for name, data in members if name.endswith(".txt")}
    assert {caption for _, _, caption in samples} == captions and len(samples) == 6
    assert not reading.lost and any("duplicated member" in m for m in reading.messages)
    images = {name.split(".")[0]: data for name, data in members if name.endswith(".jpg")}
    assert all(image == images[name.rsplit("#", 1)[1]] for name, image, _ in samples)


def test_samples_without_caption_or_image_are_lost_by_reason(tmp_path: Path) -> None:
    _write_tar(tmp_path / "t.tar", [("a.jpg", b"x"), ("a.txt", b"  "), ("b.txt", b"only text"),
                                    ("c.png", b"y"), ("c.json", json.dumps({"caption": "from json"}).encode()),
                                    ("d.webp", b"z"), ("d.txt", b"\xff\xfe")])
    samples, reading = _read(tmp_path / "t.tar")
    assert [(name.rsplit("#", 1)[1], caption) for name, _, caption in samples] == [("c", "from json")]
    assert dict(reading.lost) == {"no_caption": 2, "no_image": 1}


def test_jsonl_a_bad_line_costs_that_line(tmp_path: Path) -> None:
    info = write_shards(tmp_path, "jsonl", shards=1, per_shard=8, seed=3, image_size=16)
    path = Path(info["folder"]) / "00000.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]  # cut JSON
    lines[5] = json.dumps({"image": "images/x.jpg", "caption": 17})  # a number, not a caption
    lines.insert(7, "[1, 2]")
    path.write_text("\n".join(lines) + "\n")
    samples, reading = _read(path, "jsonl", info["folder"])
    assert len(samples) == 6 and dict(reading.lost) == {"malformed": 2, "no_caption": 1}
    assert any("line 3: not JSON" in m for m in reading.messages) and any("line 8:" in m for m in reading.messages)
    assert samples[0][0] == str(Path(info["folder"]) / json.loads(lines[0])["image"]) and samples[0][1] is None


def test_csv_a_row_with_the_wrong_field_count_costs_that_row(tmp_path: Path) -> None:
    info = write_shards(tmp_path, "csv", shards=1, per_shard=5, seed=3, image_size=16)
    path = Path(info["folder"]) / "00000.csv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3] + ",extra"
    path.write_text("\n".join(lines) + "\n")
    samples, reading = _read(path, "csv", info["folder"])
    assert len(samples) == 4 and dict(reading.lost) == {"malformed": 1}
    assert "line 4: 3 fields, the header has 2" in reading.messages[0]


def test_parquet_a_damaged_row_group_costs_its_rows_only(tmp_path: Path) -> None:
    info = write_shards(tmp_path, "parquet", shards=1, per_shard=40, seed=3, image_size=16)
    path = Path(info["folder"]) / "00000.parquet"
    pq.write_table(pq.read_table(path), path, row_group_size=10)
    samples, reading = _read(path, "parquet")
    assert len(samples) == 40 and reading.expected == 40
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata
    third = meta.row_group(2).column(1).data_page_offset  # the third row group's captions
    data[third:third + 200] = b"\x00" * 200
    path.write_bytes(bytes(data))
    samples, reading = _read(path, "parquet")
    assert len(samples) == 30 and dict(reading.lost) == {"damaged_shard": 10} and "row group 2" in reading.damage
    path.write_bytes(b"PAR1 not really")
    samples, reading = _read(path, "parquet")
    assert samples == [] and dict(reading.lost) == {"damaged_shard": 1} and "unreadable after 0 samples" in reading.damage


def test_shuffle_buffer_is_bounded_deterministic_and_a_permutation() -> None:
    held = []

    def source():
        for i in range(1000):
            held.append(i)
            yield i

    out = []
    for i in shuffled(source(), 50, np.random.default_rng(3)):
        out.append(i)
        assert len(held) - len(out) <= 50  # never more than the buffer waiting
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    assert out == list(shuffled(iter(range(1000)), 50, np.random.default_rng(3)))
    assert list(shuffled(iter(range(10)), 1, np.random.default_rng(3))) == list(range(10))  # size 1: file order


def test_chunks_mark_the_last_one() -> None:
    assert [(i, len(c), last) for i, c, last in chunks(iter(range(10)), 4)] == [(0, 4, False), (1, 4, False), (2, 2, True)]
    assert [(i, len(c), last) for i, c, last in chunks(iter(range(8)), 4)] == [(0, 4, False), (1, 4, True)]
    assert list(chunks(iter(()), 4)) == []


def test_the_ledger_counts_a_unit_read_again_once_and_keeps_eval_losses_apart() -> None:
    from qformer.data.stats import LossLedger

    ledger = LossLedger()
    ledger.add({"undecodable": 2}, unit="7:16")
    ledger.add({"damaged_shard": 5}, unit="9:3")
    ledger.add({"undecodable": 2}, unit="7:16")  # the unit read again after a restart
    ledger.add({"undecodable": 1})  # an evaluation read: no unit
    assert ledger.training() == {"undecodable": 2, "damaged_shard": 5} and ledger.total() == 8
    resumed = LossLedger()  # a new job, from the checkpoint's copy, reading the unfinished unit again
    resumed.restore(ledger.state())
    resumed.add({"damaged_shard": 5}, unit="9:3")
    resumed.add({"no_caption": 1}, unit="11:0")
    assert resumed.training() == {"undecodable": 2, "damaged_shard": 5, "no_caption": 1}

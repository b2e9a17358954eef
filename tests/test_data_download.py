"""`qformer data download` without Ray: the resumable fetcher, the archive unpacker and the download job,
against a real HTTP server on loopback (tests/http_stub.py) serving stand-ins at LAVIS's URL paths, and the
S3 test server for a bucket root. (Training on what it wrote: tests/test_dataprep_train.py.)"""
from __future__ import annotations

import errno
import hashlib
import io
import json
from pathlib import Path

import pytest

from http_stub import StubServer
from lavis_standin import coco_standin, flickr_standin, standin_catalog, vg_standin, zip_bytes
from qformer.core import http_fetch
from qformer.core.http_fetch import FetchError, RemoteFile, fetch, mirrored, parse_mirrors
from qformer.data.archives import ArchiveError, extract, is_extracted

BODY = bytes(range(256)) * 400  # 100 KiB


@pytest.fixture
def server():
    with StubServer() as s:
        yield s


def test_a_dropped_connection_resumes_with_a_range_request(server, tmp_path: Path) -> None:
    url = server.add("/f.bin", BODY, drop_after=30_000, goog_md5=True)
    got = fetch(RemoteFile(url, tmp_path / "f.bin"), backoff_s=0)
    assert (tmp_path / "f.bin").read_bytes() == BODY and not (tmp_path / "f.bin.part").exists()
    assert server.ranges_asked("/f.bin") == [None, "bytes=30000-"]
    assert got.md5_checked == "server" and got.downloaded == len(BODY)


def test_a_part_left_by_an_earlier_run_is_resumed_not_refetched(server, tmp_path: Path) -> None:
    url = server.add("/f.bin", BODY)
    (tmp_path / "f.bin.part").write_bytes(BODY[:70_000])
    got = fetch(RemoteFile(url, tmp_path / "f.bin", size=len(BODY), md5=hashlib.md5(BODY).hexdigest()))
    assert got.resumed_from == 70_000 and got.downloaded == len(BODY) - 70_000 and got.md5_checked == "published"
    assert (tmp_path / "f.bin").read_bytes() == BODY
    assert fetch(RemoteFile(url, tmp_path / "f.bin")).downloaded == 0  # in place: not fetched again


def test_a_server_that_ignores_ranges_sends_the_file_again(server, tmp_path: Path) -> None:
    url = server.add("/f.bin", BODY, ranges=False)
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    fetch(RemoteFile(url, tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_404_fails_at_once_500_after_the_retries(server, tmp_path: Path) -> None:
    server.add("/gone", status=404)
    server.add("/broken", status=500)
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(RemoteFile(server.url("/gone"), tmp_path / "gone"), backoff_s=0)
    with pytest.raises(FetchError, match="failed after 2 retries"):
        fetch(RemoteFile(server.url("/broken"), tmp_path / "broken"), retries=2, backoff_s=0)
    assert len(server.ranges_asked("/gone")) == 1 and len(server.ranges_asked("/broken")) == 3
    assert not list(tmp_path.iterdir())


def test_a_wrong_checksum_or_size_is_refused_and_nothing_kept(server, tmp_path: Path) -> None:
    url = server.add("/f.bin", BODY)
    with pytest.raises(FetchError, match="MD5 .* differs from the published 0123"):
        fetch(RemoteFile(url, tmp_path / "f.bin", md5="0123" * 8))
    with pytest.raises(FetchError, match=f"the server says {len(BODY)} bytes, the published size is 5"):
        fetch(RemoteFile(url, tmp_path / "g.bin", size=5))
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_a_full_disk_stops_keeping_the_part_for_a_resume(server, tmp_path: Path, monkeypatch) -> None:
    url = server.add("/f.bin", BODY)
    real_open = open

    class Full(io.FileIO):
        def write(self, b):  # the first MB fits, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(http_fetch, "open", lambda p, mode="r", *a, **k: Full(p, mode.replace("b", "")) if "a" in mode
                        or "w" in mode else real_open(p, mode, *a, **k), raising=False)
    with pytest.raises(FetchError, match="disk full writing .*f.bin.part .*re-run to resume"):
        fetch(RemoteFile(url, tmp_path / "f.bin"))
    assert not (tmp_path / "f.bin").exists()


def test_mirrors_replace_the_host_and_keep_the_path() -> None:
    mirrors = parse_mirrors(["http://m.local:8080/", "cs.stanford.edu=http://vg.local"])
    assert mirrored("https://storage.googleapis.com/a/b.json", mirrors) == "http://m.local:8080/a/b.json"
    assert mirrored("https://cs.stanford.edu/people/x.zip", mirrors) == "http://vg.local/people/x.zip"


def test_an_archive_unpacks_once_and_a_damaged_one_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    good = tmp_path / "good.zip"
    good.write_bytes(zip_bytes({"VG_100K/1.jpg": b"a", "VG_100K/2.jpg": b"b"}))
    target = tmp_path / "images"
    assert sorted(map(str, extract(good, target, strip=1))) == ["1.jpg", "2.jpg"]
    assert (target / "1.jpg").read_bytes() == b"a" and is_extracted(target, "good.zip")
    assert extract(good, target, strip=1) == []  # the marker: not redone
    cut = tmp_path / "cut.zip"
    cut.write_bytes(zip_bytes({"x/3.jpg": b"c" * 5000})[:3000])
    with pytest.raises(ArchiveError, match="cut.zip"):
        extract(cut, target, strip=1)
    assert not is_extracted(target, "cut.zip") and sorted(p.name for p in target.iterdir()) == \
        [".good.zip.extracted", "1.jpg", "2.jpg"]
    big = tmp_path / "big.zip"
    big.write_bytes(zip_bytes({f"d/{i}.jpg": b"z" * 100 for i in range(3)}))
    calls = []

    def full_disk(src, dst, length=0):
        calls.append(1)
        if len(calls) == 2:  # the second member finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        dst.write(src.read())

    monkeypatch.setattr("qformer.data.archives.shutil.copyfileobj", full_disk)
    with pytest.raises(ArchiveError, match="disk full unpacking .*big.zip.*300 bytes unpacked"):
        extract(big, target / "big", strip=1)
    assert not (target / "big").exists() or not any((target / "big").iterdir())  # neither files nor marker


def _serve_all(server: StubServer, tmp_path: Path, monkeypatch, **route_kw) -> dict[str, bytes]:
    bodies = {**coco_standin(tmp_path / "coco_src"), **vg_standin(tmp_path), **flickr_standin()}
    for path, body in bodies.items():
        server.add(path, body, goog_md5=path.endswith(".json"), **route_kw.get(path, {}))
    standin_catalog(monkeypatch, bodies)
    return bodies


def test_download_lays_out_what_the_builders_read_and_a_rerun_fetches_nothing(server, tmp_path: Path,
                                                                              monkeypatch) -> None:
    from qformer.jobs.data_download import download

    _serve_all(server, tmp_path, monkeypatch, **{"/zips/train2014.zip": {"drop_after": 2000}})
    root = tmp_path / "data"
    report = download(["coco", "vg", "flickr30k"], root=str(root), mirrors={"*": server.base}, backoff_s=0)
    assert not report.failed, report.summary()
    assert (root / "coco/images/train2014").is_dir() and len(list((root / "coco/images/val2014").iterdir())) == 4
    assert sorted(p.name for p in (root / "vg/images").glob("*.jpg")) == ["10.jpg", "11.jpg", "12.jpg", "13.jpg"]
    assert json.loads((root / "flickr30k/annotations/test.json").read_text())[0]["image"].startswith("flickr30k-")
    assert not (root / "downloads/coco/train2014.zip").exists()  # unpacked, then deleted
    assert "bytes=" in str(server.ranges_asked("/zips/train2014.zip"))  # the dropped archive was resumed
    assert "publisher hands them out after a request form" in report.summary()
    assert "MD5 checked (published)" in report.summary()

    from qformer.data.builders import build_builder
    from helpers import data_config

    cfg = data_config({"coco_caption": {}, "vg_caption": {}}, data_root=str(root))
    for name in ("coco_caption", "vg_caption"):
        samples = build_builder(cfg, name).train_samples()
        assert samples and all(Path(path).is_file() for path, _ in samples)

    asked = len(server.requests)
    again = download(["coco", "vg", "flickr30k"], root=str(root), mirrors={"*": server.base})
    assert len(server.requests) == asked and not again.failed  # nothing fetched
    assert "coco/images: unpacked before (train2014.zip)" in again.summary()


def test_download_names_a_truncated_archive_and_what_is_missing(server, tmp_path: Path, monkeypatch) -> None:
    from qformer.jobs.data_download import download

    bodies = _serve_all(server, tmp_path, monkeypatch)
    server.add("/people/rak248/VG_100K_2/images2.zip", bodies["/people/rak248/VG_100K_2/images2.zip"][:200])
    server.add("/people/rak248/VG_100K_2/images.zip", status=500)
    root = tmp_path / "data"
    report = download(["vg"], root=str(root), mirrors={"*": server.base}, retries=1, backoff_s=0)
    text = report.summary()
    assert len(report.failed) == 2 and "still missing (2" in text
    assert "images2.zip is damaged" in text and "images.zip: HTTP 500" not in text and "images.zip: failed after 1" in text
    assert (root / "vg/annotations/vg_caption.json").is_file()
    assert not list((root / "vg/images").glob("*.jpg")) if (root / "vg/images").exists() else True
    assert not is_extracted(root / "vg/images", "images2.zip")


def test_download_into_a_bucket(server, tmp_path: Path, monkeypatch, s3_endpoint: str) -> None:
    from qformer.data.storage import exists, read_bytes
    from qformer.jobs.data_download import download

    bodies = _serve_all(server, tmp_path, monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    report = download(["vg"], root="s3://shards/lavis", mirrors={"*": server.base}, staging=str(tmp_path / "stage"))
    assert not report.failed, report.summary()
    assert read_bytes("s3://shards/lavis/vg/annotations/vg_caption.json") == \
        bodies["/sfr-vision-language-research/LAVIS/datasets/visual_genome/vg_caption.json"]
    assert exists("s3://shards/lavis/vg/images/13.jpg") and exists("s3://shards/lavis/vg/images/.images2.zip.extracted")
    asked = len(server.requests)
    assert not download(["vg"], root="s3://shards/lavis", mirrors={"*": server.base}).failed
    assert len(server.requests) == asked


def test_the_command_fetches_flickr30k_annotations_and_says_where_the_images_come_from(server, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    for path, body in flickr_standin().items():
        server.add(path, body, goog_md5=True)
    cmd = [sys.executable, "-m", "qformer.cli", "data", "download", "flickr30k", "--root", str(tmp_path), "--mirror",
           server.base]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 of 3 files in place" in proc.stdout and "MD5 checked (server)" in proc.stdout
    assert "request form" in proc.stdout and (tmp_path / "flickr30k/annotations/val.json").is_file()
    server.add("/sfr-vision-language-research/datasets/flickr30k_test.json", status=404)
    (tmp_path / "flickr30k/annotations/test.json").unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 1 and "still missing (1" in proc.stdout and "flickr30k_test.json: HTTP 404" in proc.stdout

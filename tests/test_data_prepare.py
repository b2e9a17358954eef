"""`qformer data prepare`'s shard work without Ray (qformer.data.web_shards): the img2dataset layout, bad rows
and bad answers counted, not fatal, and the shards readable by the platform's shard reader. The Ray engine,
its resume and training on its output: tests/test_dataprep_train.py."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from http_stub import StubServer
from web_standin import serve_web_list
from qformer.data.web_shards import download_shard, read_url_list


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_a_shard_in_img2datasets_layout_counts_what_failed(tmp_path: Path, fmt: str) -> None:
    from helpers import data_config
    from qformer.data.builders import build_builder
    from qformer.data.shard_check import verify_shard

    with StubServer() as server:
        web = serve_web_list(server, tmp_path, good=12, slow_s=1.5)
        urls, caps, unreadable = read_url_list(str(web.path))
        assert unreadable == 1 and len(urls) == web.rows
        stats = download_shard(0, urls, caps, str(tmp_path / "out"), fmt, shard_size=1000, threads=8, timeout=0.5,
                               image_size=48)
    assert stats["count"] == web.rows and stats["successes"] == web.good
    assert stats["failed_to_download"] == web.failed_to_download, stats
    assert stats["failed_to_resize"] == web.not_images
    assert stats["status_dict"]["HTTP Error 404"] == 3 and stats["status_dict"]["HTTP Error 500"] == 1
    assert json.loads((tmp_path / "out/00000_stats.json").read_text()) == stats
    meta = pq.read_table(tmp_path / "out/00000.parquet").to_pylist()
    if fmt == "wds":
        assert len(meta) == web.rows and sum(r["status"] == "success" for r in meta) == web.good
        with tarfile.open(tmp_path / "out/00000.tar") as tar:
            names = tar.getnames()
        assert len(names) == 3 * web.good and names[0] == "00000000.jpg" and names[1] == "00000000.txt"
    else:
        assert len(meta) == web.good and all(r["jpg"] for r in meta) and meta[0]["txt"] == meta[0]["caption"]
    assert max(r["width"] for r in meta if r["status"] == "success") == 48  # resized: the shorter side to 48

    cfg = data_config({"web": {"builder": "image_text_shards",
                               "build_info": {"storage": str(tmp_path / "out" / f"00000.{'tar' if fmt == 'wds' else 'parquet'}")}}})
    shards = build_builder(cfg, "web").shard_set()
    reading = verify_shard(shards, shards.shards[0])
    assert reading.kept == web.good and not reading.lost and reading.damage is None
    assert reading.expected == web.good


def test_a_list_without_the_named_columns_says_which_it_has(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("URL,TEXT\nhttp://a/b.jpg,x\n")
    with pytest.raises(ValueError, match="no column 'url' \\(columns: URL, TEXT\\); name it with --url-col"):
        read_url_list(str(tmp_path / "l.csv"))
    assert read_url_list(str(tmp_path / "l.csv"), "URL", "TEXT")[0] == ["http://a/b.jpg"]

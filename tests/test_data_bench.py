"""`qformer bench data`: both loaders run over the same samples, both workloads, and the result file is written."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from qformer.bench import data as bench_data

pytestmark = pytest.mark.ray


def test_bench_data_quick(ray_cluster, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench_data.add_arguments(parser)
    args = parser.parse_args(["--quick", "--cfg-path", "experiments/demo/tiny_shapes.yaml",
                              "--options", f"run.data_root={tmp_path / 'nodata'}",
                              "--n-images", "40", "--workers", "1", "--epochs", "2", "--synth-size", "64",
                              "--out-dir", str(tmp_path / "results")])
    payload = bench_data.run(args)
    assert set(payload["workloads"]) == {"config", "stage1"}
    demo, stage1 = payload["workloads"]["config"], payload["workloads"]["stage1"]
    assert demo["image_size"] == 64 and demo["data"]["jpeg_size"] == [64, 64]
    # the platform's workload: LAVIS stage-1 COCO processor at 224 px on 640x480 photo-sized JPEGs
    assert stage1["image_size"] == 224 and stage1["vis_processors"] == ["Blip2ImageTrainProcessor"]
    assert stage1["data"]["jpeg_size"] == [640, 480] and stage1["data"]["mean_jpeg_bytes"] > 50_000
    for w in (demo, stage1):
        assert w["data"]["origin"] == "synthetic"
        assert w["ray_data"]["images_per_epoch"] == w["torch_dataloader"]["images_per_epoch"] == 40
        assert w["processes"]["ray_data"]["decode_workers"] == w["processes"]["torch_dataloader"]["workers"] == 1
        for side in ("ray_data", "torch_dataloader"):
            s = w[side]
            assert s["images_per_s"] > 0 and len(s["epoch_seconds"]) == 2 and len(s["first_batch_seconds"]) == 2
            # the side's processes did the decoding: CPU time was spent and counted, split by process kind
            assert s["cpu_ms_per_image"] > 0
            assert sum(s["cpu_ms_per_image_by_process"].values()) == pytest.approx(s["cpu_ms_per_image"])
        assert "dataloader workers" not in w["ray_data"]["cpu_ms_per_image_by_process"]
        assert "raylet" in w["ray_data"]["cpu_ms_per_image_by_process"]
        assert w["ratio_ray_vs_dataloader"] == pytest.approx(w["ray_data"]["images_per_s"] / w["torch_dataloader"]["images_per_s"])
    # 224 px decoding (~4 ms an image, well above the 10 ms CPU-clock tick over 40 images) shows up in
    # each side's own decode workers, not in the driver or the other side's processes
    for side, label in {"ray_data": "ray task workers", "torch_dataloader": "dataloader workers"}.items():
        assert stage1[side]["cpu_ms_per_image_by_process"][label] > 1.0, stage1[side]
    written = json.loads((tmp_path / "results" / "data-latest.json").read_text())
    assert written["benchmark"] == "data" and written["workers"] == 1
    assert set(written["ratio_ray_vs_dataloader"]) == {"config", "stage1"}


def test_bench_data_shards_quick(ray_cluster, tmp_path: Path) -> None:
    """`--source shards`: driver-memory cases per manifest size for both paths, and both paths' img/s over the same rows."""
    parser = argparse.ArgumentParser()
    bench_data.add_arguments(parser)
    args = parser.parse_args(["--source", "shards", "--quick", "--workload", "config",
                              "--options", f"run.data_root={tmp_path / 'nodata'}",
                              "--rows", "3000", "1000", "--shard-rows", "1000", "--read-rows", "64", "--pool", "40",
                              "--n-images", "40", "--workers", "1", "--epochs", "2", "--synth-size", "64",
                              "--out-dir", str(tmp_path / "results")])
    payload = bench_data.run(args)
    memory = payload["memory"]
    assert payload["source"] == "shards" and memory["sizes"] == [1000, 3000] and memory["pool_images"] == 40
    for path in ("table", "shards"):
        cases = memory[path]
        assert [c["rows"] for c in cases] == [1000, 3000] and [c["num_shards"] for c in cases] == [1, 3]
        for c in cases:
            assert c["path"] == path and c["rows_read"] >= 64  # read through the decode map, then stopped
            assert 0 < c["baseline_rss_mb"] <= c["peak_rss_mb"]
            assert c["rss_growth_mb"] == pytest.approx(c["peak_rss_mb"] - c["baseline_rss_mb"])
            assert c["store_peak_mb"] >= c["store_before_mb"] >= 0 and c["store_growth_mb"] >= 0
            assert 0 < c["build_s"] <= c["first_batch_s"] <= c["read_s"]
    table, shards = memory["table"], memory["shards"]
    # the table path carries its rows in the plan (tens of bytes a row at least); the shard path the names only
    for t in table:
        assert t["datasource_bytes"] > 40 * t["rows"] and t["plan_bytes"] >= t["datasource_bytes"]
        assert t["read_tasks_bytes"] > 40 * t["rows"]  # each read task holds its slice of the table
    assert table[1]["datasource_bytes"] > 2 * table[0]["datasource_bytes"]
    assert shards[1]["datasource_bytes"] - shards[0]["datasource_bytes"] < 1000  # two more shard names
    assert all(s["plan_bytes"] < t["plan_bytes"] / 5 for s, t in zip(shards, table))
    assert all(s["read_tasks_bytes"] < t["read_tasks_bytes"] / 5 for s, t in zip(shards, table))
    # the same images through both paths' real transform, epochs alternating
    speed = payload["throughput"]["config"]
    assert speed["image_size"] == 64 and speed["decode_workers"] == 1 and speed["num_shards"] == 1
    for side in ("table", "shards"):
        s = speed[side]
        assert s["images_per_epoch"] == 40 and len(s["epoch_seconds"]) == 2
        assert s["images_per_s"] > 0 and s["cpu_ms_per_image"] > 0
    assert speed["ratio_shards_vs_table"] == pytest.approx(speed["shards"]["images_per_s"] / speed["table"]["images_per_s"])
    assert payload["ratio_shards_vs_table"] == {"config": speed["ratio_shards_vs_table"]}
    written = json.loads((tmp_path / "results" / "data-shards-latest.json").read_text())
    assert written["benchmark"] == "data-shards" and written["memory"]["sizes"] == [1000, 3000]

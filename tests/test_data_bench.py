"""`qformer bench data`: both loaders run over the same samples, both workloads, and the result file is written."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from qformer.bench import data as bench_data
from qformer.bench.data_common import MAIN_LABEL

# what one driver-memory case reports (qformer.bench.data_shards.run_case)
CASE_FIELDS = {"path", "rows", "num_shards", "rows_read", "baseline_rss_mb", "built_rss_mb", "peak_rss_mb",
               "rss_growth_mb", "store_before_mb", "store_peak_mb", "store_growth_mb", "plan_bytes",
               "datasource_bytes", "read_tasks_bytes", "build_s", "first_batch_s", "read_s"}

pytestmark = pytest.mark.ray


def test_bench_data_quick(ray_cluster, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench_data.add_arguments(parser)
    args = parser.parse_args(["--quick", "--cfg-path", "experiments/demo/tiny_shapes.yaml",
                              "--options", f"run.data_root={tmp_path / 'nodata'}",
                              "--n-images", "16", "--workers", "1", "--epochs", "2", "--synth-size", "64",
                              "--pixel-images", "8", "--loss-steps", "2", "--out-dir", str(tmp_path / "results")])
    payload = bench_data.run(args)
    assert set(payload["workloads"]) == {"config", "stage1"}
    demo, stage1 = payload["workloads"]["config"], payload["workloads"]["stage1"]
    assert demo["image_size"] == 64 and demo["data"]["jpeg_size"] == [64, 64]
    # the platform's workload: LAVIS stage-1 COCO processor at 224 px on 640x480 photo-sized JPEGs
    assert stage1["image_size"] == 224 and stage1["vis_processors"] == ["Blip2ImageTrainProcessor"]
    assert stage1["data"]["jpeg_size"] == [640, 480] and stage1["data"]["mean_jpeg_bytes"] > 50_000
    for w in (demo, stage1):
        assert w["data"]["origin"] == "synthetic" and w["epochs"] == 2 and w["rounds"] == 1
        # the Ray sides read as training does: the next pass started ahead, or (fresh_start) when asked for
        sides = ("ray_data", "ray_data_exact", "ray_data_fresh_start", "torch_dataloader")
        assert [w[side]["images_per_epoch"] for side in sides] == [16, 16, 16, 16]
        assert w["train_decode"] == "reduced"  # the default; ray_data_exact is the exact path beside it
        assert w["processes"]["ray_data"]["decode_workers"] == w["processes"]["torch_dataloader"]["workers"] == 1
        for side in sides:
            s = w[side]
            assert len(s["epoch_seconds"]) == len(s["first_batch_seconds"]) == 2  # warm-up epoch reported too
            # the per-process split accounts for all of the side's CPU time
            assert sum(s["cpu_ms_per_image_by_process"].values()) == pytest.approx(s["cpu_ms_per_image"])
        # each side's CPU is metered in its own processes: its decode workers, never the other side's
        assert set(w["torch_dataloader"]["cpu_ms_per_image_by_process"]) == {MAIN_LABEL, "dataloader workers"}
        ray_kinds = set(w["ray_data"]["cpu_ms_per_image_by_process"])
        assert {MAIN_LABEL, "raylet", "ray task workers"} <= ray_kinds and "dataloader workers" not in ray_kinds
    # the reduced decode against the exact one: same crops, so pixels within resampling; the same first loss
    for w in (demo, stage1):
        pixels = w["decode_vs_exact"]["pixels"]
        assert pixels["images"] == 8 and pixels["mean_abs_diff"] < 3 and pixels["reduced_decode"] == [True]
    assert stage1["decode_vs_exact"]["pixels"]["mean_abs_diff"] > 0  # 640x480 -> 224: resampled differently
    loss = demo["decode_vs_exact"]["loss"]
    assert len(loss["loss_curve_reduced"]) == len(loss["loss_curve_exact"]) == 2
    assert len(stage1["decode_vs_exact"]["loss"]["loss_curve_reduced"]) == 2  # the tiny model at 224 px
    assert loss["loss_curve_reduced"][0] == pytest.approx(loss["loss_curve_exact"][0], abs=0.05)
    written = json.loads((tmp_path / "results" / "data-latest.json").read_text())
    assert written["benchmark"] == "data" and written["workers"] == 1
    assert set(written["ratio_ray_vs_dataloader"]) == set(written["ratio_cpu_efficiency"]) == {"config", "stage1"}
    # the first workload's sides and data at the top level
    assert {k: written[k] for k in ("ray_data", "torch_dataloader", "data")} == {
        k: written["workloads"]["config"][k] for k in ("ray_data", "torch_dataloader", "data")}


def test_bench_data_shards_quick(ray_cluster, tmp_path: Path) -> None:
    """`--source shards`: driver-memory cases per manifest size for both paths, and both paths' img/s over the same rows."""
    parser = argparse.ArgumentParser()
    bench_data.add_arguments(parser)
    args = parser.parse_args(["--source", "shards", "--quick", "--workload", "config",
                              "--options", f"run.data_root={tmp_path / 'nodata'}",
                              "--rows", "3000", "1000", "--shard-rows", "1000", "--read-rows", "64", "--pool", "40",
                              "--worker-shard-rows", "300", "50",
                              "--n-images", "40", "--workers", "1", "--epochs", "2", "--synth-size", "64",
                              "--out-dir", str(tmp_path / "results")])
    payload = bench_data.run(args)
    memory, speed = payload["memory"], payload["throughput"]["config"]
    assert payload["source"] == "shards" and memory["sizes"] == [1000, 3000] and memory["pool_images"] == 40
    for path in ("table", "shards"):
        cases = memory[path]
        assert [c["rows"] for c in cases] == [1000, 3000] and [c["num_shards"] for c in cases] == [1, 3]
        for c in cases:
            assert c.keys() == CASE_FIELDS and c["path"] == path
            # read through the decode map in whole batches, then stopped at the first batch past --read-rows
            assert 64 <= c["rows_read"] < 64 + speed["batch_size"]
    table, shards = memory["table"], memory["shards"]
    # the table path carries its rows in the plan (tens of bytes a row at least); the shard path the names only
    for t in table:
        assert t["datasource_bytes"] > 40 * t["rows"] and t["plan_bytes"] >= t["datasource_bytes"]
        assert t["read_tasks_bytes"] > 40 * t["rows"]  # each read task holds its slice of the table
    assert table[1]["datasource_bytes"] > 2 * table[0]["datasource_bytes"]
    assert shards[1]["datasource_bytes"] - shards[0]["datasource_bytes"] < 1000  # two more shard names
    assert all(s["plan_bytes"] < t["plan_bytes"] / 5 for s, t in zip(shards, table))
    assert all(s["read_tasks_bytes"] < t["read_tasks_bytes"] / 5 for s, t in zip(shards, table))
    # the same images through both paths' real transform, epochs alternating, in shards of rows_per_task rows
    assert speed["image_size"] == 64 and speed["decode_workers"] == 1
    assert speed["num_shards"] == -(-40 // speed["rows_per_task"])
    for side in ("table", "shards"):
        s = speed[side]
        assert s["images_per_epoch"] == 40 and len(s["epoch_seconds"]) == len(s["first_batch_seconds"]) == 2
        assert sum(s["cpu_ms_per_image_by_process"].values()) == pytest.approx(s["cpu_ms_per_image"])
    assert payload["ratio_shards_vs_table"] == {"config": speed["ratio_shards_vs_table"]}
    worker = payload["decode_worker_memory"]  # tars of 50 and 300 rows, the first 64+ rows read by one worker
    assert [c["rows_per_shard"] for c in worker["cases"]] == [50, 300]
    for case in worker["cases"]:
        assert 64 <= case["rows_read"] < 64 + speed["batch_size"] and case["first_batch_s"] > 0
        assert case["peak_worker_rss_mb"] > 50  # a worker was seen (torch and the tokenizer alone are more)
    assert worker["ratio_peak_largest_vs_smallest"] == pytest.approx(
        worker["cases"][1]["peak_worker_rss_mb"] / worker["cases"][0]["peak_worker_rss_mb"])
    written = json.loads((tmp_path / "results" / "data-shards-latest.json").read_text())
    assert written["benchmark"] == "data-shards" and written["memory"]["sizes"] == [1000, 3000]

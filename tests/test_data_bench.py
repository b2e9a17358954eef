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

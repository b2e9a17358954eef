"""`qformer bench data`: both loaders run over the same samples and the result file is written."""
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
    assert payload["ray_data"]["images_per_epoch"] == payload["torch_dataloader"]["images_per_epoch"] == 40
    assert payload["data"].startswith("synthetic")
    for side in ("ray_data", "torch_dataloader"):
        assert payload[side]["images_per_s"] > 0 and len(payload[side]["epoch_seconds"]) == 2
    written = json.loads((tmp_path / "results" / "data-latest.json").read_text())
    assert written["benchmark"] == "data" and written["workers"] == 1

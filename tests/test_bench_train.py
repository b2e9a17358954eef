"""`qformer bench train`: a short real run; with --epochs and --next-pass-baseline, each epoch's wait for its
first batch with the next pass started ahead and started when asked for (no timings asserted)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from helpers import tiny_options
from qformer.bench import train as bench_train

pytestmark = pytest.mark.ray


def test_bench_train_reports_each_epochs_first_batch_wait_both_ways(ray_cluster, tiny_bert, tmp_path: Path):
    from qformer.data.synth import write_synthetic

    write_synthetic(tmp_path / "data" / "synth_shapes", n_train=16, n_val=4, n_test=4, image_size=64,
                    captions_per_image=1)
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(["--steps", "6", "--epochs", "3", "--next-pass-baseline", "--out-dir", str(tmp_path / "out"),
                              "--options", *tiny_options(tiny_bert), f"run.data_root={tmp_path / 'data'}",
                              "run.batch_size_train=4", "run.ray.num_workers=0", "run.amp=false"])
    payload = bench_train.run(args)
    baseline = payload["next_pass_baseline"]
    assert payload["epochs"] == 3 and payload["steps"] == 6  # 2 steps in each of 3 epochs
    assert "run.data.next_pass_ahead=false" not in payload["options"]
    for waits in (payload["first_batch_wait_s"], baseline["first_batch_wait_s"]):
        assert len(waits) == 3 and all(isinstance(w, float) and w >= 0 for w in waits), waits
    assert payload["first_batch_wait_s"] != baseline["first_batch_wait_s"]  # two runs, each measured
    [written] = (tmp_path / "out").glob("train-2*.json")
    assert json.loads(written.read_text())["next_pass_baseline"] == baseline

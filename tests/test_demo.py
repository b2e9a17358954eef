"""`qformer demo` end to end, shortened by --options: data present -> train on local Ray -> retrieval before/after."""
from __future__ import annotations

from pathlib import Path

import pytest

from qformer import paths

pytestmark = pytest.mark.ray


def test_demo_trains_and_reports_before_after(ray_cluster, tmp_path, capsys):
    from qformer.data.synth import write_synthetic
    from qformer.demo import run_demo

    root = paths.data_root(None) / "synth_shapes"  # where experiments/demo/tiny_shapes.yaml points
    write_synthetic(root, n_train=8, n_val=4, n_test=4, image_size=64, captions_per_image=2)
    stamp = (root / "annotations" / "coco_karpathy_train.json").stat().st_mtime_ns
    options = ["run.max_epoch=1", "run.max_steps_per_epoch=2", "run.batch_size_train=4", "run.batch_size_eval=4",
               "run.valid_splits=[]", "run.k_test=2", "run.log_freq=1", "model.num_query_token=4",
               f"run.output_dir={tmp_path}/demo", f"run.mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
               "run.data.batch_size=8"]
    summary = run_demo(None, options)
    assert (root / "annotations" / "coco_karpathy_train.json").stat().st_mtime_ns == stamp  # not regenerated
    assert summary["split"] == "test"
    for side in ("before", "after"):
        assert 0.0 <= summary[side]["r_mean"] <= 100.0 and "txt_r1" in summary[side]
    assert Path(summary["checkpoint"], "checkpoint.pth").is_file()
    out = capsys.readouterr().out
    assert "=== qformer demo ===" in out and f"run {summary['mlflow_run_id']}" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out and " -> " in out

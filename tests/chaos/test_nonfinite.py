"""A loss driven to NaN/inf by the configuration (a learning rate of 1e30), with and without skipping."""
from __future__ import annotations

import re

import pytest
from chaos_helpers import ChaosRow, chaos_cfg, client_for, latest_run_id, loss_steps

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.slow]


def test_nonfinite_loss_stops_with_the_last_good_checkpoint(ray_cluster, tiny_bert, shapes, tmp_path, chaos_report):
    from qformer.train.checkpoint import load_file
    from qformer.jobs.train_job import launch_training

    cfg = chaos_cfg(tiny_bert, shapes, tmp_path, "nan", {"max_steps_per_epoch": 8, "init_lr": 1e30, "warmup_steps": 0})
    with pytest.raises(Exception, match=r"non-finite loss \(NaN/inf\) between global steps") as info:
        launch_training(cfg, local_mode=True)
    first_bad, last_bad = map(int, re.search(r"between global steps (\d+) and (\d+)", str(info.value)).groups())
    uri = cfg.run.mlflow.tracking_uri
    run_id = latest_run_id(uri)
    assert client_for(uri).get_run(run_id).info.status == "FAILED"
    kept = sorted((tmp_path / "nan").glob("ray_results/*/local_checkpoints/*/checkpoint.pth"))
    for file in kept:  # every checkpoint kept holds finite weights
        state = load_file(file)
        assert all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point()), file
    stopped_at = max(loss_steps(uri, run_id), default=0)
    chaos_report(ChaosRow("non-finite loss (run.init_lr=1e30)", "stops naming the steps; every kept checkpoint "
                          "is finite", None, None, 1, None))
    # checked every step (log_freq 1): the run stops at the first bad step, logged no loss from it on
    assert first_bad == last_bad and stopped_at == first_bad - 1


def test_skip_nonfinite_skips_counts_and_finishes(ray_cluster, tiny_bert, shapes, tmp_path, chaos_report):
    from qformer.jobs.train_job import launch_training

    cfg = chaos_cfg(tiny_bert, shapes, tmp_path, "nan_skip", {"max_steps_per_epoch": 8, "init_lr": 1e30, "warmup_steps": 0,
                                                   "skip_nonfinite": True})
    result = launch_training(cfg, local_mode=True)
    assert result.error is None and result.metrics["step"] == 8
    uri = cfg.run.mlflow.tracking_uri
    client = client_for(uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    skipped = max(m.value for m in client.get_metric_history(run.info.run_id, "skipped_nonfinite"))
    assert skipped >= 1
    chaos_report(ChaosRow("non-finite loss with run.skip_nonfinite", "non-finite steps skipped and counted "
                          f"({int(skipped)} of 8), the run finishes", None, None, 1, None))

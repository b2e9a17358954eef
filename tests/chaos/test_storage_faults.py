"""Checkpoint storage that fills up, and a newest checkpoint truncated before a re-run (Train local mode)."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest
from chaos_helpers import ChaosRow, chaos_cfg, client_for, latest_run_id, loss_steps, wait_for
from step_hooks import FailOnceAtStep

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real tmpfs (root only), resized during the test to make the disk fill up."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_checkpoint_storage_fails_clearly_and_keeps_the_previous_checkpoint(ray_cluster, shapes, tmp_path,
                                                                                   small_tmpfs, chaos_report):
    from qformer.jobs.eval_job import evaluate_checkpoint
    from qformer.train.checkpoint import CheckpointWriteError
    from qformer.jobs.train_job import launch_training

    cfg = chaos_cfg(shapes, tmp_path, "disk_full", {"max_steps_per_epoch": 6, "test_splits": ["test"],
                                                    "ray": {"storage_path": str(small_tmpfs)}})
    outcome: dict = {}

    def train() -> None:
        try:
            launch_training(cfg, local_mode=True)
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            outcome["error"] = err

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    first = wait_for(lambda: next(iter(small_tmpfs.glob("*/local_checkpoints/epoch=0000-step=00000002/meta.json")),
                                  None), 300, "the step-2 checkpoint")
    size = (first.parent / "checkpoint.pth").stat().st_size
    used = shutil.disk_usage(small_tmpfs).used
    # room for half a checkpoint more: the step-4 save runs out of space mid-write
    subprocess.run(["mount", "-o", f"remount,size={used + size // 2}", str(small_tmpfs)], check=True)
    thread.join(600)
    err = outcome.get("error")
    assert err is not None, "training should fail on the full disk"
    chain, cause = [], err
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    write_errors = [e for e in chain if isinstance(e, CheckpointWriteError)] or [err]
    message = str(write_errors[0])
    assert "epoch=0000-step=00000004" in message and "no space left on the device" in message, message
    local = first.parent.parent
    assert sorted(p.name for p in local.iterdir()) == ["epoch=0000-step=00000002"]  # nothing partial kept
    # the previous checkpoint still loads and evaluates
    metrics = evaluate_checkpoint(cfg, first.parent, ["test"], track=False, local=True).metrics
    assert 0.0 <= metrics["test/r_mean"] <= 100.0
    chaos_report(ChaosRow("checkpoint storage full (tmpfs)", "the error names path and cause, no partial "
                          "checkpoint, the previous one loads and evaluates", 2, None, 1, None))


def test_truncated_newest_checkpoint_is_passed_over_for_the_previous_one(ray_cluster, shapes, tmp_path,
                                                                        monkeypatch, chaos_report, caplog):
    from qformer.jobs.train_job import launch_training

    cfg = chaos_cfg(shapes, tmp_path, "truncated", {"max_steps_per_epoch": 6})
    uri = cfg.run.mlflow.tracking_uri
    with pytest.raises(Exception, match="injected failure"):  # checkpoints at steps 2 and 4, then a crash
        launch_training(cfg, local_mode=True, step_hooks=[FailOnceAtStep(5, str(tmp_path / "failed_once"))])
    newest = next((tmp_path / "truncated").glob("ray_results/*/local_checkpoints/epoch=0000-step=00000004"))
    with open(newest / "checkpoint.pth", "r+b") as f:
        f.truncate(f.seek(0, 2) // 3)
    t0 = time.monotonic()
    result = launch_training(cfg, local_mode=True)
    recover_s = time.monotonic() - t0
    assert result.error is None and result.metrics["step"] == 6
    assert f"checkpoint {newest} is incomplete" in caplog.text
    run_id = latest_run_id(uri)
    assert result.mlflow_run_id == run_id and client_for(uri).get_run(run_id).info.status == "FINISHED"
    assert loss_steps(uri, run_id) == [1, 2, 3, 4, 5, 6]  # steps 3-4 re-run from step 2, logged once
    chaos_report(ChaosRow("newest checkpoint truncated before the re-run", "passed over with a warning; "
                          "resumes from the previous good one", 0, 2, 1, recover_s))

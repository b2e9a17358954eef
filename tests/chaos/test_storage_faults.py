"""Checkpoint storage that fills up, and a newest checkpoint truncated before a re-run (Train local mode)."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from chaos_helpers import ChaosRow, chaos_cfg, client_for, latest_run_id, loss_steps
from step_hooks import FailOnceAtStep

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.slow]


class FillAtStep3:
    """A step hook: after step 3 (the step-2 checkpoint is written, the step-4 one is next) the checkpoint
    storage has room for half a checkpoint more. `tmpfs`: the real tmpfs is shrunk to that size.
    `enospc`: torch.save writes half of the file under `root`, then fails as a full disk fails a write."""

    def __init__(self, kind: str, root: Path):
        self.kind, self.root = kind, root

    def __call__(self, step: int, rank: int) -> None:
        if step != 3:
            return
        [first] = self.root.glob("*/local_checkpoints/epoch=0000-step=00000002/checkpoint.pth")
        size = first.stat().st_size
        if self.kind == "tmpfs":
            used = shutil.disk_usage(self.root).used
            subprocess.run(["mount", "-o", f"remount,size={used + size // 2}", str(self.root)], check=True)
            return
        import torch

        save, root = torch.save, str(self.root)

        def save_until_full(obj, f, *args, **kwargs):
            if not str(f).startswith(root):
                return save(obj, f, *args, **kwargs)
            Path(f).write_bytes(b"\0" * (size // 2))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

        torch.save = save_until_full  # restored by the test


@pytest.fixture(params=["tmpfs", "enospc"])
def full_storage(request, tmp_path, monkeypatch):
    """(kind, checkpoint storage dir) for a storage that fills up: a real tmpfs where this machine lets the
    test mount one (root), and everywhere an injected ENOSPC at the checkpoint writer."""
    storage = tmp_path / "storage"
    storage.mkdir()
    if request.param == "enospc":
        import torch

        monkeypatch.setattr(torch, "save", torch.save)  # FillAtStep3 replaces it; this puts it back
        yield request.param, storage
        return
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the enospc case injects the same fault")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", str(storage)], check=True, capture_output=True)
    try:
        yield request.param, storage
    finally:
        subprocess.run(["umount", "-l", str(storage)], capture_output=True)


def test_full_checkpoint_storage_fails_clearly_and_keeps_the_previous_checkpoint(ray_cluster, tiny_bert, shapes, tmp_path,
                                                                                   full_storage, chaos_report):
    from qformer.jobs.eval_job import evaluate_checkpoint
    from qformer.train.checkpoint import CheckpointWriteError, incomplete
    from qformer.jobs.train_job import launch_training

    kind, storage = full_storage
    cfg = chaos_cfg(tiny_bert, shapes, tmp_path, "disk_full", {"max_steps_per_epoch": 6, "test_splits": ["test"],
                                                               "ray": {"storage_path": str(storage)}})
    with pytest.raises(BaseException) as info:
        launch_training(cfg, local_mode=True, step_hooks=[FillAtStep3(kind, storage)])
    chain, cause = [], info.value
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    write_errors = [e for e in chain if isinstance(e, CheckpointWriteError)] or [info.value]
    message = str(write_errors[0])
    assert "epoch=0000-step=00000004" in message and "no space left on the device" in message, message
    [first] = storage.glob("*/local_checkpoints/epoch=0000-step=00000002")
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # nothing partial kept
    # the previous checkpoint is whole, loads and evaluates
    assert incomplete(first) is None
    metrics = evaluate_checkpoint(cfg, first, ["test"], track=False, local=True).metrics
    recalls = {side: [metrics[f"test/{side}_r{k}"] for k in (1, 5, 10)] for side in ("txt", "img")}
    assert metrics["test/skipped_images"] == 0
    assert metrics["test/r_mean"] == pytest.approx((sum(recalls["txt"]) + sum(recalls["img"])) / 6)
    chaos_report(ChaosRow(f"checkpoint storage full ({kind})", "the error names path and cause, no partial "
                          "checkpoint, the previous one loads and evaluates", 2, None, 1, None))


def test_truncated_newest_checkpoint_is_passed_over_for_the_previous_one(ray_cluster, tiny_bert, shapes, tmp_path,
                                                                        monkeypatch, chaos_report, caplog):
    from qformer.jobs.train_job import launch_training

    cfg = chaos_cfg(tiny_bert, shapes, tmp_path, "truncated", {"max_steps_per_epoch": 6})
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

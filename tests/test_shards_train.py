"""Training on shards end to end: each format through `launch_training` (what `qformer train` runs),
one from the S3 test server, a mid-epoch crash and re-launch that neither repeats nor skips data, and
a missing shard that stops `qformer train` before Ray starts.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qformer.data.storage import upload_tree
from qformer.data.synth_shards import write_shards
from helpers import audit_rows, shards_config
from step_hooks import FailOnceAtStep

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("fmt", ["wds", "parquet", "jsonl", "csv"])
def test_train_reads_each_format(ray_cluster, tiny_bert, tmp_path: Path, fmt: str) -> None:
    from qformer.jobs.train_job import launch_training

    info = write_shards(tmp_path / "data", fmt, shards=2, per_shard=8, seed=1, image_size=64)
    result = launch_training(shards_config(tiny_bert, tmp_path, info["storage"], fmt), local_mode=True)
    assert result.error is None and result.metrics["step"] == 4  # 16 pairs, batch 4, one epoch


def test_train_from_object_storage(ray_cluster, tiny_bert, s3_endpoint: str, tmp_path: Path) -> None:
    from qformer.jobs.train_job import launch_training

    info = write_shards(tmp_path / "data", "wds", shards=2, per_shard=8, seed=2, image_size=64)
    upload_tree(info["folder"], "s3://shards/train-wds", s3_endpoint)
    cfg = shards_config(tiny_bert, tmp_path, "s3://shards/train-wds/{00000..00001}.tar", "s3",
                        data={"s3_endpoint": s3_endpoint})
    result = launch_training(cfg, local_mode=True)
    assert result.error is None and result.metrics["step"] == 4


def test_crash_mid_epoch_then_relaunch_neither_repeats_nor_skips(ray_cluster, tiny_bert, tmp_path: Path, monkeypatch) -> None:
    """A crash after the step-3 checkpoint of a 12-step epoch (mid-chunk: chunks hold 8 rows); the re-launch
    continues from that checkpoint's data position: with the rows trained up to it, every pair exactly once."""
    from qformer.jobs.train_job import launch_training

    info = write_shards(tmp_path / "data", "wds", shards=3, per_shard=16, seed=3, image_size=64)
    cfg = shards_config(tiny_bert, tmp_path, info["storage"], "resume", {"save_freq_steps": 3})
    debug = tmp_path / "debug"
    cfg.run.data.audit_dir = str(debug)  # which rows each step trained on
    with pytest.raises(Exception, match="injected failure"):
        launch_training(cfg, local_mode=True, step_hooks=[FailOnceAtStep(5, str(tmp_path / "failed_once"))])
    crashed = audit_rows(debug)
    assert [s for s, _ in crashed] == [1, 2, 3, 4, 5]
    (debug / "rows-rank0.jsonl").unlink()
    result = launch_training(cfg, local_mode=True)
    resumed = audit_rows(debug)
    assert result.error is None and resumed[0][0] == 4  # the step after the checkpoint
    kept = [i for s, ids in crashed if s <= 3 for i in ids]  # trained into the checkpoint's weights
    after = [i for _, ids in resumed for i in ids]
    everything = set(kept) | set(after)
    assert len(everything) == 48  # no pair skipped (48 pairs, 12 full batches)
    assert not set(kept) & set(after) and len(kept) + len(after) == 48  # none repeated
    assert result.metrics["step"] == 12  # the epoch's step count as if uninterrupted


def test_missing_shard_stops_train_before_ray_starts(tiny_bert, tmp_path: Path) -> None:
    info = write_shards(tmp_path / "data", "parquet", shards=2, per_shard=4, seed=1, image_size=64)
    spec = info["storage"].replace("00001}", "00003}")  # names 00002 and 00003 too
    cfg_path = tmp_path / "exp.yaml"
    import yaml

    from omegaconf import OmegaConf

    cfg = shards_config(tiny_bert, tmp_path, spec, "missing")
    yaml.safe_dump(OmegaConf.to_container(cfg, resolve=True), cfg_path.open("w"))
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "qformer.cli", "train", "--cfg-path", str(cfg_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "datasets.web.build_info.storage" in proc.stderr and "2 of 4 shards do not exist" in proc.stderr
    assert "00002.parquet" in proc.stderr and "00003.parquet" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_resumed_at_another_world_size_the_pass_is_re_split_from_the_position(ray_cluster, tiny_bert, tmp_path: Path,
                                                                              monkeypatch) -> None:
    """2 DDP workers train half an epoch and fail; the run continues on 1 worker (global_batch mode: 2
    micro-batches per step) from the checkpoint, whose position merges what both ranks had trained on.
    Across the attempts every pair is trained exactly once."""
    from qformer.jobs.train_job import launch_training

    info = write_shards(tmp_path / "data", "wds", shards=4, per_shard=16, seed=4, image_size=64)
    run = {"batch_size_train": 2, "save_freq_steps": 4, "log_freq": 4, "elastic": {"global_batch": 4}}
    two = shards_config(tiny_bert, tmp_path, info["storage"], "resize", {
        **run, "ray": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}, "max_failures": 0, "use_gpu": False}})
    debug = tmp_path / "debug"
    two.run.data.audit_dir = str(debug)
    with pytest.raises(Exception, match="injected failure"):
        launch_training(two, step_hooks=[FailOnceAtStep(7, str(tmp_path / "failed_once"))])
    before = [audit_rows(debug / f"rows-rank{r}.jsonl") for r in (0, 1)]
    (debug / "rows-rank0.jsonl").unlink()
    one = shards_config(tiny_bert, tmp_path, info["storage"], "resize", {
        **run, "ray": {"num_workers": 1, "resources_per_worker": {"CPU": 0.5}, "max_failures": 0, "use_gpu": False}})
    one.run.data.audit_dir = str(debug)
    result = launch_training(one)
    assert result.error is None and result.metrics["step"] == 16  # 64 pairs / global batch 4, as uninterrupted
    after_rows = audit_rows(debug / "rows-rank0.jsonl")
    assert after_rows[0][0] == 5 and [s for s, _ in after_rows].count(5) == 2  # 2 micro-batches per step
    kept = [i for rank in before for s, ids in rank if s <= 4 for i in ids]
    after = [i for _, ids in after_rows for i in ids]
    assert len(set(kept) | set(after)) == 64 and not set(kept) & set(after)  # nothing skipped or repeated
    assert len(after) == len(set(after)) == 48


def test_iteration_based_run_mixes_shards_with_coco_by_ratio(ray_cluster, tiny_bert, tmp_path: Path) -> None:
    """runner_iter over two endless streams, a shard set and COCO-format annotations, drawn by ratio."""
    from qformer.data.synth import coco_caption_section, write_synthetic
    from qformer.jobs.train_job import launch_training

    info = write_shards(tmp_path / "data", "parquet", shards=2, per_shard=8, seed=5, image_size=64)
    write_synthetic(tmp_path / "coco", n_train=8, n_val=2, n_test=2, image_size=64, captions_per_image=2)
    coco = coco_caption_section(tmp_path / "coco")["coco_caption"]
    coco["vis_processor"] = {"train": {"name": "blip2_image_train", "image_size": 64}}
    cfg = shards_config(tiny_bert, tmp_path, info["storage"], "mixed", {"runner": "runner_iter", "max_iters": 10,
                                                   "iters_per_inner_epoch": 5,
                                                   "train_dataset_ratios": {"web": 3, "coco_caption": 1}},
               more_datasets={"coco_caption": coco})
    result = launch_training(cfg, local_mode=True)
    assert result.error is None and result.metrics["step"] == 10  # web's 16 pairs cycle past a pass

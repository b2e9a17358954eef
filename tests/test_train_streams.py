"""The worker's training stream hands the step host batches (pinned on a GPU machine), wherever Ray Train would
put them: the step plans the text on the host and then copies non-blocking (qformer.train.step)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qformer.config import batch_plan

pytestmark = pytest.mark.ray


def test_batches_stay_on_the_host_inside_a_train_worker_with_an_accelerator(ray_cluster, monkeypatch):
    """Inside a Train worker Ray's default device is the worker's accelerator: it would copy every batch there
    first, and the step's host-side text plan (and the copy's overlap) would be lost. The accelerator is
    stood in for by torch's `meta` device."""
    import ray.data
    import ray.train
    import ray.train.torch
    import ray.train.utils

    from qformer.train.streams import TrainingStreams

    rows = [{"text_ids": np.array([i, i + 1, 0]), "image": np.full((3, 4), i, dtype=np.uint8)} for i in range(8)]
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: ray.data.from_items(rows))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("meta"))
    monkeypatch.setattr(ray.train.utils, "_in_ray_train_worker", lambda: True)
    run = OmegaConf.create({"seed": 1, "batch_size_train": 4, "accum_grad_iters": 1, "max_steps_per_epoch": None,
                            "ray": {"num_workers": 1}, "elastic": {"keep": "global_batch", "global_batch": None,
                                                                   "max_worker_batch": None},
                            "data": {"shuffle_buffer": 0, "prefetch_batches": 1}})
    streams = TrainingStreams(run, batch_plan.plan_for(run, 1, (1, 1)), None, {"train": 8}, None, None, rank=0)
    steps = list(streams.steps(epoch=0, begin=0))
    streams.close()
    batches = [micro for step in steps for micro in step]
    assert len(batches) == 2
    for batch in batches:
        assert {t.device.type for t in batch.values()} == {"cpu"}
        assert batch["text_ids"].shape == (4, 3)

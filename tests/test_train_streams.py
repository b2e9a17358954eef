"""The worker's training stream reads one step ahead where the epoch length is unknown (so the loop knows the
epoch's last step), and hands the step host batches (pinned on a GPU machine), wherever Ray Train would put
them: the step plans the text on the host and then copies non-blocking (qformer.train.step)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qformer.config import batch_plan
from qformer.data.position import ROW, UNIT, UNIT_ROWS


class _Shard:
    """A dataset shard of `n` host batches of one read unit (what Ray Data hands a worker), counting reads."""

    def __init__(self, n: int) -> None:
        self.n, self.read = n, 0

    def iter_torch_batches(self, **_: object):
        for i in range(self.n):
            self.read += 1
            yield {"x": torch.full((2,), i), UNIT: torch.tensor([7, 7]), UNIT_ROWS: torch.tensor([2 * self.n] * 2),
                   ROW: torch.tensor([2 * i, 2 * i + 1])}


def _run(max_steps_per_epoch=None):
    return OmegaConf.create({"seed": 1, "batch_size_train": 2, "accum_grad_iters": 1,
                             "max_steps_per_epoch": max_steps_per_epoch, "ray": {"num_workers": 1},
                             "elastic": {"keep": "global_batch", "global_batch": None, "max_worker_batch": None},
                             "data": {"shuffle_buffer": 0, "prefetch_batches": 1}})


def test_a_stream_of_unknown_length_flags_its_last_step_and_a_checkpoint_never_counts_the_step_read_ahead(
        monkeypatch):
    """One stream read to its end: the epoch's length is known only there, so each step is read one ahead and
    the last one is flagged (the loop writes one checkpoint, the epoch-end one, at that step). The step read
    ahead is not in the position a checkpoint settles: a resume would otherwise skip it."""
    import ray.train

    from qformer.train.streams import TrainingStreams

    shard = _Shard(3)
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: shard)
    run = _run()
    streams = TrainingStreams(run, batch_plan.plan_for(run, 1, (1, 1)), None, {"train": 6}, None, None, rank=0)
    steps = streams.steps(epoch=0, begin=0)
    group, last = next(steps)
    assert not last and shard.read == 2  # the next step is read ahead
    assert streams.settled_positions()["train"]["partial"] == {"7": [0, 1]}  # the step handed over, not the next
    assert UNIT not in group[0]
    rest = list(steps)
    assert [last for _, last in rest] == [False, True]
    assert [int(g[0]["x"][0]) for g, _ in rest] == [1, 2]


def test_a_stream_of_known_length_reads_no_step_ahead(monkeypatch):
    import ray.train

    from qformer.train.streams import TrainingStreams

    shard = _Shard(3)
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: shard)
    run = _run(max_steps_per_epoch=3)
    streams = TrainingStreams(run, batch_plan.plan_for(run, 1, (1, 1)), None, {"train": 6}, None, None, rank=0)
    steps = streams.steps(epoch=0, begin=0)
    assert next(steps)[1] is False and shard.read == 1
    assert [last for _, last in steps] == [False, False]  # the loop counts to the length itself


@pytest.mark.ray
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
    assert [last for _, last in steps] == [False, True]
    batches = [micro for step, _ in steps for micro in step]
    assert len(batches) == 2
    for batch in batches:
        assert {t.device.type for t in batch.values()} == {"cpu"}
        assert batch["text_ids"].shape == (4, 3)

"""Elastic training without Ray: the batch plan per world size, its config errors, a step of several
micro-batches (what a smaller world runs), and the LR factor of per_worker_batch mode."""
from __future__ import annotations

import math

import pytest
import torch

from qformer.config import ConfigError, load_config_dict
from qformer.config import batch_plan
from qformer.train.step import train_step
from test_train_step import _state
from test_train_toys import ToyRegressor, toy_batch


def _run(*options: str):
    return load_config_dict({"model": {"arch": "blip2", "model_type": "tiny"}}, list(options)).run


def test_global_batch_mode_doubles_accumulation_when_half_the_workers_remain():
    run = _run("run.ray.num_workers=[1,2]", "run.batch_size_train=4")
    full, half = batch_plan.plan_for(run, 2), batch_plan.plan_for(run, 1)
    assert (full.worker_batch, full.micro_per_step, full.accum_grad_iters) == (4, 1, 1)
    assert (half.worker_batch, half.micro_per_step, half.accum_grad_iters) == (4, 2, 2)
    assert full.global_batch == half.global_batch == 8 and full.samples_per_step == half.samples_per_step == 8
    assert half.lr_scale == full.lr_scale == 1.0


def test_global_batch_mode_uses_the_memory_cap_before_accumulating():
    run = _run("run.ray.num_workers=[2,4]", "run.batch_size_train=4", "run.accum_grad_iters=2",
               "run.elastic.max_worker_batch=8")
    two = batch_plan.plan_for(run, 2)
    assert (two.worker_batch, two.micro_per_step, two.accum_grad_iters, two.global_batch) == (8, 1, 2, 32)
    three = batch_plan.plan_for(run, 3)  # 16 samples per step do not split over 3 workers: nearest below
    assert not three.exact and three.global_batch == 30
    assert batch_plan.check(run) == ["run.elastic.keep=global_batch: at 3 workers the global batch is 30, not 32 "
                                  "(16 samples per step do not split evenly over 3 workers)"]


def test_a_fixed_world_trains_as_configured():
    run = _run("run.ray.num_workers=4", "run.batch_size_train=6", "run.accum_grad_iters=3")
    plan = batch_plan.plan_for(run, 4)
    assert (plan.worker_batch, plan.micro_per_step, plan.accum_grad_iters, plan.lr_scale) == (6, 1, 3, 1.0)
    assert batch_plan.plan_for(_run("run.ray.num_workers=0"), 1, (1, 1)).micro_per_step == 1  # Train local mode


@pytest.mark.parametrize("scaling, factor", [("linear", 0.25), ("sqrt", 0.5)])
def test_per_worker_batch_mode_scales_the_lr(scaling, factor):
    run = _run("run.ray.num_workers=[1,4]", "run.elastic.keep=per_worker_batch", f"run.elastic.lr_scaling={scaling}")
    plan = batch_plan.plan_for(run, 1)
    assert (plan.worker_batch, plan.accum_grad_iters, plan.global_batch) == (100, 1, 100)
    assert plan.lr_scale == pytest.approx(factor)
    ref = _run("run.ray.num_workers=[1,4]", "run.elastic.keep=per_worker_batch", "run.elastic.reference_world=2")
    assert batch_plan.plan_for(ref, 4).lr_scale == pytest.approx(2.0)


@pytest.mark.parametrize("options, key, fragment", [
    (["run.ray.num_workers=[3,4]"], "run.ray.num_workers", "3 workers cannot make the global batch 400 exactly"),
    (["run.ray.num_workers=[2,4]", "run.elastic.global_batch=6", "run.accum_grad_iters=4"],
     "run.elastic.global_batch", "not a multiple of run.accum_grad_iters"),
    (["run.ray.num_workers=[1,8]", "run.elastic.global_batch=4"], "run.ray.num_workers", "fewer samples than workers"),
    (["run.ray.num_workers=[0,2]"], "run.ray.num_workers", "1 <= min <= max"),
    (["run.ray.num_workers=[2,1]"], "run.ray.num_workers", "1 <= min <= max"),
    (["run.ray.num_workers=[1,2,3]"], "run.ray.num_workers", "[min, max]"),
    (["run.elastic.keep=global"], "run.elastic.keep", "global_batch, per_worker_batch"),
    (["run.elastic.lr_scaling=log"], "run.elastic.lr_scaling", "linear, sqrt"),
    (["run.ray.elastic_resize_interval_s=-1"], "run.ray.elastic_resize_interval_s", "must be >= 0"),
])
def test_bad_elastic_settings_name_the_key_before_anything_starts(options, key, fragment):
    with pytest.raises(ConfigError) as info:
        _run(*options)
    assert info.value.key == key and info.value.source == "--options" and fragment in str(info.value)


def test_per_worker_batch_mode_accepts_any_range():
    assert _run("run.ray.num_workers=[3,7]", "run.elastic.keep=per_worker_batch").ray.num_workers == [3, 7]


def test_a_step_of_two_micro_batches_equals_the_full_batch_step():
    """What one worker does in place of two: same optimiser steps, same weights, one step counted per step."""
    full, halves = ToyRegressor(), ToyRegressor()
    s_full, s_half = _state(full, accum=1), _state(halves, accum=2)
    s_half.micro_per_step = 2
    for k in range(3):
        batch = toy_batch(8, seed=k)
        train_step(s_full, batch, epoch=0, iter_in_epoch=k)
        outs = [train_step(s_half, {key: v[j * 4:(j + 1) * 4] for key, v in batch.items()}, epoch=0, iter_in_epoch=k,
                           micro=j) for j in (0, 1)]
        assert [o.optimizer_stepped for o in outs] == [False, True]
        assert s_half.global_step == s_full.global_step == k + 1
    for a, b in zip(full.parameters(), halves.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lr_scale_survives_a_checkpoint_of_another_world():
    model = ToyRegressor()
    state = _state(model, lr_sched="linear_warmup_cosine_lr", warmup_lr=0.0, warmup_steps=4)
    state.scheduler.lr_scale = 0.5
    saved = state.scheduler.state_dict()
    other = _state(ToyRegressor(), lr_sched="linear_warmup_cosine_lr", warmup_lr=0.0, warmup_steps=4)
    other.scheduler.load_state_dict(saved)
    other.scheduler.lr_scale = 2.0  # what the loop does after loading: the current world's factor
    other.scheduler.step(1, 0)
    expected = (1e-2 - 0.0) * 0.5 * (1 + math.cos(math.pi * 1 / 4))
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * expected)

"""LAVIS LR schedules (spec §5.2/§5.3) against the spec's formulas and numbers."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from qformer.train.lr_schedule import (
    LinearWarmupCosineLR,
    LinearWarmupStepLR,
    WarmupConstantLR,
    build_lr_scheduler,
    schedule_max_epoch,
)


def _opt(n_groups: int = 2) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr_scale": 0.5 ** i} for i in range(n_groups)]
    return torch.optim.AdamW(groups, lr=1e-4)


def _lrs(sched, epoch: int, step: int) -> list[float]:
    sched.step(epoch, step)
    return [g["lr"] for g in sched.optimizer.param_groups]


def test_cosine_matches_spec_numbers():
    s = LinearWarmupCosineLR(_opt(), max_epoch=10, min_lr=1e-5, init_lr=1e-4, warmup_start_lr=1e-6, warmup_steps=5000)
    expected = {1: 9.78e-5, 2: 9.14e-5, 3: 8.15e-5, 5: 5.5e-5, 9: 1.22e-5}
    for epoch, value in expected.items():
        for step in (0, 17, 866):  # constant within an epoch: per-epoch cosine, not per step
            lrs = _lrs(s, epoch, step)
            assert lrs[0] == pytest.approx(value, rel=2e-3)
            assert lrs[0] == lrs[1]  # every group gets the same LR; lr_scale is ignored (LAVIS)
    assert _lrs(s, 9, 0)[0] > 1e-5  # min_lr is never reached


def test_warmup_only_in_epoch0_indexed_by_in_epoch_step():
    s = LinearWarmupCosineLR(_opt(), max_epoch=10, min_lr=1e-5, init_lr=1e-4, warmup_start_lr=1e-6, warmup_steps=5000)
    assert _lrs(s, 0, 0)[0] == pytest.approx(1e-6)
    assert _lrs(s, 0, 2500)[0] == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    # spec: epoch 0 of COCO+VG has ~867 iterations, so warm-up only reaches ~1.8e-5 ...
    assert _lrs(s, 0, 866)[0] == pytest.approx(1e-6 + (1e-4 - 1e-6) * 866 / 5000)
    assert _lrs(s, 0, 866)[0] == pytest.approx(1.8e-5, rel=0.05)
    # ... then jumps to the epoch-1 cosine value; epoch 1 step 0 is NOT warm-up
    assert _lrs(s, 1, 0)[0] == pytest.approx(9.78e-5, rel=2e-3)
    # after warm-up inside epoch 0 the LR stays at init_lr
    short = LinearWarmupCosineLR(_opt(), max_epoch=10, min_lr=1e-5, init_lr=1e-4, warmup_start_lr=0.0, warmup_steps=10)
    assert _lrs(short, 0, 5)[0] == pytest.approx(5e-5)
    assert _lrs(short, 0, 10)[0] == pytest.approx(1e-4)
    assert _lrs(short, 0, 400)[0] == pytest.approx(1e-4)


def test_negative_warmup_lr_means_no_warmup():
    s = LinearWarmupCosineLR(_opt(), max_epoch=10, min_lr=1e-5, init_lr=1e-4, warmup_start_lr=-1, warmup_steps=5000)
    assert _lrs(s, 0, 0)[0] == pytest.approx(1e-4)
    assert _lrs(s, 0, 100)[0] == pytest.approx(1e-4)


def test_step_lr_formula():
    s = LinearWarmupStepLR(_opt(), min_lr=1e-5, init_lr=1e-4, decay_rate=0.5, warmup_start_lr=1e-6, warmup_steps=4)
    assert _lrs(s, 0, 2)[0] == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    assert _lrs(s, 1, 0)[0] == pytest.approx(5e-5)
    assert _lrs(s, 2, 3)[0] == pytest.approx(2.5e-5)
    assert _lrs(s, 4, 0)[0] == pytest.approx(1e-5)  # max(min_lr, 1e-4 * 0.5**4 = 6.25e-6)


def test_constant_lr():
    s = WarmupConstantLR(_opt(), init_lr=3e-4, warmup_start_lr=1e-5, warmup_steps=3)
    assert _lrs(s, 0, 0)[0] == pytest.approx(1e-5)
    assert _lrs(s, 0, 1)[0] == pytest.approx(1e-5 + (3e-4 - 1e-5) / 3)
    assert _lrs(s, 0, 9)[0] == pytest.approx(3e-4)
    assert _lrs(s, 7, 0)[0] == pytest.approx(3e-4)


def test_state_dict_round_trip_restores_position():
    s = LinearWarmupCosineLR(_opt(), max_epoch=10, min_lr=1e-5, init_lr=1e-4, warmup_start_lr=1e-6, warmup_steps=50)
    for step in range(7):
        s.step(0, step)
    state = s.state_dict()
    fresh = LinearWarmupCosineLR(_opt(), max_epoch=10, min_lr=1e-5, init_lr=1e-4, warmup_start_lr=1e-6, warmup_steps=50)
    fresh.load_state_dict(state)
    assert fresh.position == (0, 6)
    fresh.step()  # re-apply the restored position
    assert fresh.get_last_lr()[0] == pytest.approx(1e-6 + (1e-4 - 1e-6) * 6 / 50)
    assert fresh.last_epoch == s.last_epoch + 1


def test_build_from_run_config_and_iteration_runner_horizon():
    run = OmegaConf.create({"lr_sched": "linear_warmup_cosine_lr", "init_lr": 1e-4, "min_lr": 1e-5, "warmup_lr": -1,
                            "warmup_steps": 0, "max_epoch": 10, "max_iters": 6000, "iters_per_inner_epoch": 1000})
    assert schedule_max_epoch(run) == 6  # runner_iter: int(max_iters / iters_per_inner_epoch)
    s = build_lr_scheduler(_opt(), run)
    assert isinstance(s, LinearWarmupCosineLR) and s.max_epoch == 6
    assert _lrs(s, 3, 999)[0] == pytest.approx((1e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 3 / 6)) + 1e-5)
    run.max_iters = None
    assert build_lr_scheduler(_opt(), run).max_epoch == 10
    run.lr_sched = "constant_lr"
    assert isinstance(build_lr_scheduler(_opt(), run), WarmupConstantLR)


def test_bad_schedule_config_names_the_key():
    run = OmegaConf.create({"lr_sched": "linear_warmup_step_lr", "init_lr": 1e-4, "min_lr": 0, "max_epoch": 2, "lr_decay_rate": None})
    with pytest.raises(Exception, match="run.lr_decay_rate"):
        build_lr_scheduler(_opt(), run)
    run.lr_sched = "cosine"
    with pytest.raises(Exception, match="run.lr_sched"):
        build_lr_scheduler(_opt(), run)
    run2 = OmegaConf.create({"init_lr": 1e-4, "max_epoch": 2, "max_iters": 10, "iters_per_inner_epoch": None})
    with pytest.raises(Exception, match="run.iters_per_inner_epoch"):
        schedule_max_epoch(run2)

"""The per-micro-batch train step without Ray: order, accumulation, AMP, logging, non-finite losses."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from qformer.train.amp import resolve_amp
from qformer.train.lr_schedule import build_lr_scheduler
from qformer.train.optim import build_optimizer
from qformer.train.step import NonFiniteLossError, TrainState, check_finite, train_step
from test_train_toys import ToyRegressor, toy_batch


def _state(model, accum: int = 1, amp: bool = False, skip: bool = False, lr_sched: str = "constant_lr", **run) -> TrainState:
    cfg = OmegaConf.create({"init_lr": 1e-2, "min_lr": 0.0, "warmup_lr": -1, "warmup_steps": 0, "max_epoch": 4,
                            "lr_sched": lr_sched, "weight_decay": 0.05, "beta2": 0.999, "lr_layer_decay": 1.0, **run})
    opt = build_optimizer(model, cfg)
    device = torch.device("cpu")
    policy = resolve_amp(amp, "auto", device)
    return TrainState(model=model, optimizer=opt, scheduler=build_lr_scheduler(opt, cfg), amp=policy, device=device,
                      scaler=policy.make_scaler(), accum_grad_iters=accum, skip_nonfinite=skip)


def test_accumulation_equals_larger_batch():
    big, small = ToyRegressor(), ToyRegressor()
    s_big, s_small = _state(big, accum=1), _state(small, accum=2)
    for k in range(3):
        full = toy_batch(8, seed=k)
        train_step(s_big, full, epoch=0, iter_in_epoch=k)
        halves = [{key: v[:4] for key, v in full.items()}, {key: v[4:] for key, v in full.items()}]
        train_step(s_small, halves[0], epoch=0, iter_in_epoch=2 * k)
        out = train_step(s_small, halves[1], epoch=0, iter_in_epoch=2 * k + 1)
        assert out.optimizer_stepped
    assert s_small.optimizer_steps == s_big.optimizer_steps == 3
    assert s_small.global_step == 6
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(big.proj.weight, ToyRegressor().proj.weight)  # training did move the weights


def test_logged_loss_is_not_divided_and_optimizer_steps_every_accum():
    model = ToyRegressor()
    state = _state(model, accum=4)
    batch = toy_batch(4, seed=1)
    with torch.no_grad():
        expected = model(batch).loss
    out = train_step(state, batch, epoch=0, iter_in_epoch=0)
    # LAVIS logs loss / accum_grad_iters (spec §7 item 6); we log the real loss
    torch.testing.assert_close(out.losses["loss"], expected)
    assert set(out.losses) == {"loss", "loss_itc", "loss_itm", "loss_lm"}
    assert not out.optimizer_stepped and model.proj.weight.grad is not None
    stepped = [train_step(state, toy_batch(4, seed=i), 0, i).optimizer_stepped for i in range(1, 8)]
    assert stepped == [False, False, True, False, False, False, True]
    assert model.proj.weight.grad is None  # zero_grad(set_to_none) after the step


def test_scheduler_steps_before_forward_every_micro_batch():
    model = ToyRegressor()
    state = _state(model, accum=2, lr_sched="linear_warmup_cosine_lr", warmup_lr=0.0, warmup_steps=4)
    model.lr_source = state.optimizer
    for i in range(3):
        train_step(state, toy_batch(2, seed=i), epoch=0, iter_in_epoch=i)
    train_step(state, toy_batch(2, seed=9), epoch=1, iter_in_epoch=0)
    lr = 1e-2
    assert model.seen_lrs == pytest.approx([0.0, lr / 4, 2 * lr / 4, state.scheduler.lr_at(1, 0)])


def test_grad_norm_only_on_log_steps():
    import copy

    state = _state(ToyRegressor(), accum=1)
    assert train_step(state, toy_batch(4, 0), 0, 0).grad_norm is None
    twin = copy.deepcopy(state.model)  # the weights the logged step's gradients are taken at
    out = train_step(state, toy_batch(4, 1), 0, 1, log=True)
    twin(toy_batch(4, 1)).loss.backward()
    expected = torch.cat([p.grad.flatten() for p in twin.parameters() if p.grad is not None]).norm()
    assert out.grad_norm == pytest.approx(float(expected), rel=1e-5)  # the norm of the step's gradients, before clipping
    assert out.lr == pytest.approx(1e-2)


def test_bf16_autocast_on_cpu():
    model = ToyRegressor()
    state = _state(model, amp=True)
    assert state.amp.dtype == torch.bfloat16 and state.scaler is None
    before = model.proj.weight.detach().clone()
    out = train_step(state, toy_batch(4, 0), 0, 0, log=True)
    assert model.seen_dtypes[-1] == torch.bfloat16  # matmuls ran in bf16
    assert model.proj.weight.dtype == torch.float32  # master weights stay fp32
    assert torch.isfinite(out.losses["loss"]) and not torch.equal(before, model.proj.weight)
    off = _state(ToyRegressor(), amp=False)
    train_step(off, toy_batch(4, 0), 0, 0)
    assert off.model.seen_dtypes[-1] == torch.float32


def test_nonfinite_loss_raises_at_check():
    state = _state(ToyRegressor())
    train_step(state, toy_batch(4, 0), 0, 0)
    check_finite(state)  # fine so far
    bad = {**toy_batch(4, 1), "poison": torch.ones(4, dtype=torch.bool)}
    train_step(state, bad, 0, 1)
    train_step(state, toy_batch(4, 2), 0, 2)
    with pytest.raises(NonFiniteLossError, match="between global steps 2 and 3"):
        check_finite(state)


def test_nonfinite_loss_skipped_and_counted():
    model = ToyRegressor()
    state = _state(model, skip=True, accum=2)
    train_step(state, toy_batch(4, 0), 0, 0)
    train_step(state, toy_batch(4, 1), 0, 1)
    good = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bad = {**toy_batch(4, 2), "poison": torch.ones(4, dtype=torch.bool)}
    train_step(state, bad, 0, 2)
    out = train_step(state, toy_batch(4, 3), 0, 3)
    assert not out.optimizer_stepped and state.skipped_nonfinite == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, good[k]), k  # the poisoned window changed nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())
    out = train_step(state, toy_batch(4, 4), 0, 4)
    out = train_step(state, toy_batch(4, 5), 0, 5)
    assert out.optimizer_stepped and state.optimizer_steps == 2
    check_finite(state)  # skip mode never raises


def test_amp_dtype_choices():
    cpu = torch.device("cpu")
    assert resolve_amp(True, "auto", cpu).dtype == torch.bfloat16
    fp16 = resolve_amp(True, "auto", torch.device("cuda"))
    assert fp16.dtype == torch.float16 and fp16.use_scaler
    assert not resolve_amp(False, "fp16", cpu).enabled
    with pytest.raises(ValueError, match="run.amp_dtype"):
        resolve_amp(True, "fp8", cpu)

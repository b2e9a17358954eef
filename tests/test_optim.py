"""AdamW as LAVIS's runner builds it (spec §5.2)."""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from helpers import small_model
from test_train_toys import ToyRegressor, toy_batch
from qformer.train.amp import resolve_amp
from qformer.train.optim import build_optimizer, load_optimizer_state
from qformer.train.step import TrainState


def test_adamw_groups_betas_eps():
    model = ToyRegressor()
    run = OmegaConf.create({"init_lr": 1e-4, "weight_decay": 0.05, "beta2": 0.98, "lr_layer_decay": 1.0})
    opt = build_optimizer(model, run)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-8
    assert all(g["lr"] == 1e-4 for g in opt.param_groups)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.proj.weight) in ids and id(model.frozen.weight) not in ids  # frozen params never reach AdamW
    assert id(model.temp) in {id(p) for p in decay["params"]}  # 0-dim temp is decayed (LAVIS HEAD)


RUN = OmegaConf.create({"init_lr": 1e-3, "weight_decay": 0.05, "beta2": 0.999, "lr_layer_decay": 1.0})


def test_kernel_is_fused_on_cpu_also_under_a_grad_scaler():
    model = ToyRegressor()
    optimizer = build_optimizer(model, RUN)
    assert optimizer.param_groups[0]["fused"] is True
    policy = resolve_amp(True, "fp16", "cpu")  # fp16: a GradScaler drives the fused kernel
    state = TrainState(model=model, optimizer=optimizer, scheduler=None, amp=policy, device=torch.device("cpu"),
                       scaler=policy.make_scaler())
    assert state.optimizer_steps == 0 and state.skipped_overflow == 0


def test_fused_adamw_trains_the_qformer_as_the_per_tensor_loop_did(tiny_bert):
    """Today's losses within 1e-5, step after step: the fused kernel changes the speed, not the maths."""
    losses = {}
    for kernel in ("loop", "chosen"):
        model = small_model(tiny_bert)  # seeded, eval mode: no dropout
        if kernel == "loop":
            groups = model.get_optimizer_params(weight_decay=0.05)
            opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, foreach=False)
        else:
            opt = build_optimizer(model, RUN)
            assert opt.param_groups[0]["fused"]
        losses[kernel] = []
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            ids = torch.randint(5, len(model.tokenizer) - 1, (4, 10), generator=g)
            torch.manual_seed(step)  # ITM negatives drawn alike
            out = model({"image": torch.randn(4, 3, 32, 32, generator=g), "text_ids": ids,
                         "text_atts": torch.ones_like(ids)})
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[kernel].append(out.loss.item())
    assert losses["chosen"] == pytest.approx(losses["loop"], abs=1e-5)
    assert losses["loop"][-1] < losses["loop"][0] - 0.1  # it trained: later steps would show a wrong update


def test_load_optimizer_state_keeps_this_runs_kernel():
    """A checkpoint from the per-tensor loop (or from before the fused kernel) resumes on the fused one."""
    def run(opt, model, steps):
        for k in range(steps):
            opt.zero_grad(set_to_none=True)
            model(toy_batch(8, seed=k)).loss.backward()
            opt.step()

    old_model = ToyRegressor()
    old = torch.optim.AdamW(old_model.get_optimizer_params(0.05), lr=1e-3, foreach=False)
    run(old, old_model, 3)
    new_model = ToyRegressor()
    new_model.load_state_dict(old_model.state_dict())
    new = build_optimizer(new_model, RUN)
    load_optimizer_state(new, copy.deepcopy(old.state_dict()))  # as from a file: no tensors shared with `old`
    assert new.param_groups[0]["fused"] is True and new.param_groups[0]["foreach"] is None
    run(old, old_model, 2)
    run(new, new_model, 2)
    for a, b in zip(old_model.parameters(), new_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

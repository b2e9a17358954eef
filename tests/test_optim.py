"""AdamW as LAVIS's runner builds it (spec §5.2)."""
from __future__ import annotations

from omegaconf import OmegaConf

from test_train_toys import ToyRegressor
from qformer.train.optim import build_optimizer


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

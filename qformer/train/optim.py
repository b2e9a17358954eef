"""The optimiser LAVIS's RunnerBase builds (spec §5.2): AdamW over the model's own parameter groups."""
from __future__ import annotations

from typing import Any

import torch


def build_optimizer(model: torch.nn.Module, run_cfg: Any) -> torch.optim.AdamW:
    """AdamW(model.get_optimizer_params(weight_decay, lr_layer_decay), lr=init_lr, betas=(0.9, beta2), eps=1e-8).

    The grouping (no decay for 1-D params and biases, decay for `temp`, per-layer ViT groups when the ViT
    is trainable) is the model's business; `lr_scale` in the groups is ignored by the LR schedulers, as in LAVIS.
    """
    groups = model.get_optimizer_params(
        weight_decay=float(run_cfg.get("weight_decay", 0.05)),
        lr_scale=float(run_cfg.get("lr_layer_decay", 1.0) or 1.0),
    )
    groups = [g for g in groups if len(g["params"]) > 0]
    if not groups:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    beta2 = float(run_cfg.get("beta2", 0.999))
    return torch.optim.AdamW(groups, lr=float(run_cfg.init_lr), betas=(0.9, beta2), eps=1e-8)

"""Small deterministic models for the train-step tests (our own test models; the real one is Blip2Qformer)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ToyOutput:
    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_lm: torch.Tensor


class ToyRegressor(torch.nn.Module):
    """Mean-squared error of a linear map: a per-sample-mean loss, so accumulation == a larger batch."""

    def __init__(self, dim: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(dim, dim)
        self.temp = torch.nn.Parameter(0.07 * torch.ones([]))
        self.frozen = torch.nn.Linear(dim, dim)
        self.frozen.requires_grad_(False)
        self.seen_dtypes: list[torch.dtype] = []
        self.seen_lrs: list[float] = []
        self.lr_source: torch.optim.Optimizer | None = None

    def get_optimizer_params(self, weight_decay: float, lr_scale: float = 1.0) -> list[dict]:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
                {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale}]

    def forward(self, samples: dict) -> ToyOutput:
        if self.lr_source is not None:
            self.seen_lrs.append(self.lr_source.param_groups[0]["lr"])
        pred = self.proj(samples["x"])
        self.seen_dtypes.append(pred.dtype)
        itc = ((pred.float() - samples["y"]) ** 2).mean()
        itm = (self.temp - 0.1) ** 2
        lm = pred.float().abs().mean() * 0.01
        if "poison" in samples and bool(samples["poison"].any()):
            itc = itc * float("nan")
        return ToyOutput(loss=itc + itm + lm, loss_itc=itc, loss_itm=itm, loss_lm=lm)


def toy_batch(n: int, seed: int, dim: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, dim, generator=g), "y": torch.randn(n, dim, generator=g)}

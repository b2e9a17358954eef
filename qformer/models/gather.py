"""Cross-rank gathers used by the losses; each works without a process group (world size 1)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0; the result is detached (even this rank's slice)."""
    if world_size == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gathered gradients over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def all_gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0, with gradient flowing back to every source rank."""
    if world_size == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)

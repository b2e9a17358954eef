"""Cross-rank gathers used by the losses; each works without a process group (world size 1)."""
from __future__ import annotations

import functools

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
    """all_gather whose backward gives each rank the sum over ranks of its own slice's gradient.

    The backward is an all-to-all (rank r receives every rank's gradient of slice r) and a local sum: each
    rank sends (W-1)/W of the stacked gradient, half of what an all-reduce of the whole stack sends, and
    nothing of the other ranks' sums is materialised. (gloo's reduce_scatter sends as much as its all-reduce,
    measured; NCCL's equals the all-to-all.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        send = torch.stack([g.contiguous() for g in grads])  # chunk r goes to rank r
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send)
        return received.sum(0)


def all_gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0, with gradient flowing back to every source rank."""
    if world_size == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


@functools.lru_cache(maxsize=1)
def _host_group(default_group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A gloo group beside `default_group` (NCCL on GPUs): collectives on host tensors, no device involved.
    Made by every rank at the same first call (all ranks plan the same micro-batch)."""
    return dist.new_group(backend="gloo")


def host_max_over_ranks(value: int) -> int:
    """The largest of every rank's host-side `value` (e.g. a text width planned on the CPU) without reading
    anything back from the device: a CPU all-reduce of one integer."""
    _, world = dist_rank_world()
    if world == 1:
        return value
    box = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_host_group(dist.group.WORLD))
    return int(box.item())

"""Sharding and variable-size gathers for evaluation; all of it degrades to no-ops without a process group."""
from __future__ import annotations

import torch
import torch.distributed as dist

from qformer.evaluate.rerank import RerankEntries


def resolve_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit (rank, world_size) if given, else the default process group's, else (0, 1)."""
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if world_size > 1 and not initialised:
        raise RuntimeError(f"world_size={world_size} needs an initialised torch.distributed process group")
    if initialised and world_size != dist.get_world_size():
        raise ValueError(f"world_size={world_size} does not match the process group's {dist.get_world_size()}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    return rank, world_size


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous, balanced share of n items (sizes differ by at most one; empty only when n < world_size)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _comm_device(local: torch.device) -> torch.device:
    """NCCL only moves CUDA tensors; gloo wants CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_shards(local: torch.Tensor, n_total: int, world_size: int) -> torch.Tensor:
    """Concatenate each rank's `shard_range` rows (rank order) into all n_total rows, on every rank.

    `local` has shard_range(n_total, rank, world_size) rows (possibly zero) and the same trailing shape and
    dtype on every rank. Shares are padded to the largest one for all_gather, then trimmed.
    """
    if world_size == 1:
        return local
    out_device = local.device
    comm = _comm_device(local.device)
    biggest = len(shard_range(n_total, 0, world_size))
    padded = torch.zeros((biggest, *local.shape[1:]), dtype=local.dtype, device=comm)
    padded[: local.shape[0]] = local.to(comm)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    rows = [parts[r][: len(shard_range(n_total, r, world_size))] for r in range(world_size)]
    return torch.cat(rows).to(out_device)


def _gather_variable(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """all_gather of 1-D tensors whose lengths differ per rank."""
    comm = _comm_device(x.device)
    n = torch.tensor([x.shape[0]], device=comm)
    sizes = [torch.empty_like(n) for _ in range(world_size)]
    dist.all_gather(sizes, n)
    sizes_l = [int(s) for s in sizes]
    padded = torch.zeros(max(sizes_l), dtype=x.dtype, device=comm)
    padded[: x.shape[0]] = x.to(comm)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_l)]).to(x.device)


def gather_entries(entries: RerankEntries, world_size: int) -> RerankEntries:
    """Every rank's re-ranked entries on every rank (each entry is computed by exactly one rank).

    LAVIS instead all-reduces two dense N_img x N_txt matrices; the sparse form moves k_test/N_txt of that.
    """
    if world_size == 1:
        return entries
    fields = RerankEntries.__dataclass_fields__
    return RerankEntries(**{f: _gather_variable(getattr(entries, f), world_size) for f in fields})

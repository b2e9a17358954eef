"""Loss averages kept on the device (no host sync per step) and read, all-reduced, at log steps / epoch end."""
from __future__ import annotations

import os
import resource

import torch
import torch.distributed as dist


class LossMeter:
    """Running sums of detached losses; `mean()` averages over steps and ranks (a collective when distributed).

    Non-finite values are left out (they only appear in skip_nonfinite mode), so one bad step cannot turn a
    whole window's average into NaN.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            finite = torch.isfinite(value)
            value = torch.where(finite, value, torch.zeros_like(value))
            if key in self._sums:
                self._sums[key] += value
                self._counts[key] += finite
            else:
                self._sums[key] = value.clone()
                self._counts[key] = finite.to(torch.float32)

    def mean(self, reset: bool = True) -> dict[str, float]:
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        packed = torch.stack([self._sums[k] for k in keys] + [self._counts[k] for k in keys]).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        values = packed.tolist()
        n = len(keys)
        out = {k: (values[i] / values[n + i] if values[n + i] else float("nan")) for i, k in enumerate(keys)}
        if reset:
            self._sums.clear()
            self._counts.clear()
        return out


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory (GiB) on CUDA, plus this process's current and peak resident memory."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        out["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as fh:
            out["cpu_rss_gb"] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        pass
    out["cpu_rss_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return out

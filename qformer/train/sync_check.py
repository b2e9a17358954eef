"""Find host-device synchronisations in a code region (issue 9: none in the hot loop).

On CUDA, torch's own sync debug mode raises at the offending call. The same code paths run on CPU,
where nothing waits, so there a dispatch mode records the ops that would make the host wait for a
GPU: reading a value back (`.item()`, `int()`, `bool()` of a tensor), data-dependent shapes
(boolean-mask indexing, nonzero, masked_select), and tensors made from Python data (`torch.tensor`,
`torch.as_tensor` of a list: on a GPU, a blocking copy from pageable host memory).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
SYNC_OPS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
            _aten.equal.default, _aten.is_nonzero.default}


class SyncRecorder(TorchDispatchMode):
    """Records (does not block) every op in the region that would sync on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        indices = args[1] if func is _aten.index.Tensor and len(args) > 1 else ()
        # a Python scalar becomes a 0-dim CPU tensor that CUDA kernels take by value: only data with a shape copies
        from_host = func is _aten.lift_fresh.default and args[0].dim() > 0
        if func in SYNC_OPS or from_host or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.seen.append(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_device_sync(device: torch.device | str) -> Iterator[list[str]]:
    """CUDA: errors on any sync inside (torch.cuda.set_sync_debug_mode). CPU: yields the list of ops
    that would have synced, filled when the region ends."""
    if torch.device(device).type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield []
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return
    recorder = SyncRecorder()
    with recorder:
        yield recorder.seen

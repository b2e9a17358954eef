"""Mixed-precision policy from run.amp / run.amp_dtype (LAVIS: fp16 autocast + GradScaler on CUDA)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class AmpPolicy:
    device_type: str  # "cuda" | "cpu" (what torch.autocast wants)
    dtype: torch.dtype | None  # None: autocast off
    use_scaler: bool  # GradScaler only makes sense for fp16
    init_scale: float = 2.0**16  # torch's (and so LAVIS's) GradScaler defaults
    growth_interval: int = 2000

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def vit_fp16_on_cpu(self) -> bool:
        """fp16 autocast on a CPU: the frozen ViT is converted to fp16 as on a GPU (model.vit_precision: fp16)."""
        return self.device_type == "cpu" and self.dtype == torch.float16

    def make_scaler(self) -> torch.amp.GradScaler | None:
        # defaults = LAVIS's torch.cuda.amp.GradScaler(): init 2^16, growth x2 every 2000 good steps, backoff 0.5
        if not self.use_scaler:
            return None
        return torch.amp.GradScaler(self.device_type, init_scale=self.init_scale, growth_interval=self.growth_interval)

    def describe(self) -> str:
        if self.dtype is None:
            return "off (fp32)"
        name = "fp16" if self.dtype == torch.float16 else "bf16"
        return f"{name} autocast on {self.device_type}" + (" + GradScaler" if self.use_scaler else "")


def amp_for_run(run: Any, device: torch.device | str) -> AmpPolicy:
    """The policy of a config's `run` section (run.amp, run.amp_dtype, run.amp_init_scale, run.amp_growth_interval)."""
    return resolve_amp(bool(run.get("amp", True)), run.get("amp_dtype"), device,
                       init_scale=float(run.get("amp_init_scale") or 2.0**16),
                       growth_interval=int(run.get("amp_growth_interval") or 2000))


def resolve_amp(amp: bool, amp_dtype: str | None, device: torch.device | str, init_scale: float = 2.0**16,
                growth_interval: int = 2000) -> AmpPolicy:
    """auto = fp16 + GradScaler on CUDA (LAVIS), bf16 on CPU (CPU fp16 autocast is slow and scaler-less in LAVIS)."""
    device_type = torch.device(device).type
    device_type = "cuda" if device_type == "cuda" else "cpu"
    if not amp:
        return AmpPolicy(device_type, None, False)
    choice = (amp_dtype or "auto").lower()
    if choice == "auto":
        choice = "fp16" if device_type == "cuda" else "bf16"
    if choice not in _DTYPES:
        raise ValueError(f"run.amp_dtype: {amp_dtype!r} is not one of auto, fp16, bf16")
    dtype = _DTYPES[choice]
    return AmpPolicy(device_type, dtype, use_scaler=dtype == torch.float16, init_scale=init_scale,
                     growth_interval=growth_interval)

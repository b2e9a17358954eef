"""CLIP normalisation on the training device: uint8 [B,3,S,S] -> float, = LAVIS ToTensor + Normalize."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from qformer.data.builders import processor_cfg
from qformer.data.processors.image import CLIP_MEAN, CLIP_STD


def normalize_uint8(
    images: torch.Tensor,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(x / 255 - mean) / std per channel, computed where `images` lives (GPU: no float traffic)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_uint8 expects uint8 images, got {images.dtype}")
    m, s = channel_stats(tuple(mean), tuple(std), dtype, images.device)
    return (images.to(dtype) / 255.0 - m) / s


@functools.lru_cache(maxsize=16)
def channel_stats(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[1,C,1,1] mean and std tensors, made once per device: on a GPU each creation is a blocking host->device
    copy, which per micro-batch would sync the host every step."""
    def table(values: tuple[float, ...]) -> torch.Tensor:
        with torch.inference_mode(False):  # a normal tensor even if first made during evaluation
            return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)

    return table(mean), table(std)


def image_mean_std(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the first train dataset's vis processor (LAVIS default: CLIP's)."""
    for name in cfg.datasets:
        node = processor_cfg(cfg, name, "vis_processor", "train")
        if node is not None:
            return tuple(node.get("mean") or CLIP_MEAN), tuple(node.get("std") or CLIP_STD)
    return CLIP_MEAN, CLIP_STD

"""Reading ViT weight files (path or URL), position-embedding interpolation, fp16 conversion."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from qformer.core.uri_files import is_object_uri, local_copy
from qformer.models.checkpoint_io import read_checkpoint

log = logging.getLogger(__name__)


def read_weights(source: str) -> dict[str, torch.Tensor]:
    """State dict from `model.vit_weights`: a local file, a URL fetched once into torch.hub's cache, or an
    s3:// / gs:// object copied once (see qformer.core.uri_files)."""
    if is_object_uri(source):
        try:
            source = str(local_copy(source))
        except FileNotFoundError as err:
            raise ValueError(f"model.vit_weights: {err}") from None
    if source.endswith(".safetensors"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"model.vit_weights: file not found: {source}")
        state = safetensors.torch.load_file(str(path))
    else:
        if not source.startswith(("http://", "https://")) and not Path(source).expanduser().is_file():
            raise ValueError(f"model.vit_weights: file not found: {source}")
        state = read_checkpoint(source)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"model.vit_weights={source}: not a state dict")
    return state


def interpolate_pos_embed(pos: torch.Tensor, num_patches: int, align_corners: bool, in_fp32: bool) -> torch.Tensor:
    """Resize a [1?, 1+G*G, C] absolute position table to 1+num_patches rows (CLS row kept, bicubic).

    As LAVIS, per encoder: EVA (`in_fp32`) resizes the table as fp32 and keeps the fp32 result, so an fp16
    file's table is not rounded again; CLIP resizes in the file's own dtype.
    """
    squeeze = pos.dim() == 2
    table = pos[None] if squeeze else pos
    extra = table.shape[1] - int(math.isqrt(table.shape[1] - 1)) ** 2
    old = int(math.isqrt(table.shape[1] - extra))
    new = int(math.isqrt(num_patches))
    if old == new:
        return pos
    log.info("interpolating ViT position embedding %dx%d -> %dx%d", old, old, new, new)
    if in_fp32:
        table = table.float()
    cls, grid = table[:, :extra], table[:, extra:]
    c = grid.shape[-1]
    grid = grid.reshape(1, old, old, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=align_corners)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, c)
    out = torch.cat([cls, grid], dim=1)
    return out[0] if squeeze else out


def convert_weights_to_fp16(model: nn.Module) -> None:
    """LAVIS `convert_weights_to_fp16`: the weights and biases of Conv1d/Conv2d/Linear layers become half.

    Everything else stays fp32, as in LAVIS: norms, EVA's class token, position table and q/v biases, CLIP's
    class/position embeddings and `nn.MultiheadAttention`'s packed input projection (LAVIS's block that would
    halve it is commented out; under autocast the projection runs in fp16 either way).
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.half()
            if module.bias is not None:
                module.bias.data = module.bias.data.half()

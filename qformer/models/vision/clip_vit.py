"""OpenAI-CLIP ViT-L/14 as BLIP-2 uses it (spec §3.3): 23 residual blocks, QuickGELU, ln_pre, no ln_post.

Parameter names follow LAVIS `clip_vit.py` (`conv1`, `class_embedding`, `positional_embedding`,
`ln_pre`, `transformer.resblocks.{i}.{attn,ln_1,mlp.c_fc,mlp.c_proj,ln_2}`) so `clip_vit_L.pth` loads.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class LayerNorm(nn.LayerNorm):
    """Computes in fp32 and casts back (CLIP's fp16-safe LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))])
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, B, C] (sequence first, as CLIP)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])


class ClipVisionTransformer(nn.Module):
    def __init__(
        self, input_resolution: int = 224, patch_size: int = 14, width: int = 1024, layers: int = 23, heads: int = 16,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.input_resolution = input_resolution
        self.num_features = width
        self.use_checkpoint = use_checkpoint
        self.num_patches = (input_resolution // patch_size) ** 2
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.num_patches + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x).transpose(0, 1)
        for block in self.transformer.resblocks:
            if self.use_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x.transpose(0, 1)


def create_clip_vit_L(img_size: int = 224, use_checkpoint: bool = False, **sizes) -> ClipVisionTransformer:
    """LAVIS `create_clip_vit_L` sizes (1024 wide, 23 layers, 16 heads); `sizes` overrides for tests."""
    args = dict(patch_size=14, width=1024, layers=23, heads=16)
    args.update(sizes)
    return ClipVisionTransformer(input_resolution=img_size, use_checkpoint=use_checkpoint, **args)

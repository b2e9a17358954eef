"""EVA-CLIP ViT-g/14 as BLIP-2 uses it (spec §3.3): 39 pre-norm blocks, q/v bias only, no final norm.

Parameter names follow LAVIS `eva_vit.py` so `eva_vit_g.pth` loads with `load_state_dict`.
All sizes are constructor arguments so tests can build a tiny copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} does not match the ViT's {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias.to(self.qkv.weight.dtype))
        q, k, v = qkv.view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, drop_path: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class EvaVisionTransformer(nn.Module):
    """Returns all tokens ([CLS] + patches) of the last block; no final norm, no head."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        embed_dim: int = 1408,
        depth: int = 39,
        num_heads: int = 16,
        mlp_ratio: float = 4.3637,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_features = embed_dim
        self.use_checkpoint = use_checkpoint
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear 0..rate
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, hidden, rates[i], eps) for i in range(depth)])
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))
        # As LAVIS: the class token and position table stay fp32 (convert_weights_to_fp16 leaves them), so
        # under fp16 autocast the concatenation promotes and the residual stream is fp32; each block's
        # matmuls run in fp16 and their fp16 outputs are added to it. Casting them down would keep the
        # whole stream in fp16 (3x the error against fp32, measured: docs/performance.md).
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            if self.use_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def create_eva_vit_g(
    img_size: int = 224, drop_path_rate: float = 0.0, use_checkpoint: bool = False, **sizes
) -> EvaVisionTransformer:
    """LAVIS `create_eva_vit_g` sizes (1408 wide, 39 blocks, 16 heads of 88, MLP 6144); `sizes` overrides for tests."""
    args = dict(patch_size=14, embed_dim=1408, depth=39, num_heads=1408 // 88, mlp_ratio=4.3637)
    args.update(sizes)
    return EvaVisionTransformer(img_size=img_size, drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint, **args)

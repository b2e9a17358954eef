"""Layer numbers of an image encoder's parameters, for LAVIS's layer-wise LR decay groups (EVA's
get_num_layer): the embeddings are layer 0, block i is layer i + 1, anything after the blocks is the last."""
from __future__ import annotations

from torch import nn


def vit_num_layers(encoder: nn.Module) -> int:
    """Transformer blocks of an EVA / CLIP / timm encoder (0 when none are found)."""
    for attr in ("blocks", "transformer.resblocks", "model.blocks"):
        obj = encoder
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
            return len(obj)
        except AttributeError:
            continue
    return 0


def vit_layer_id(name: str, num_layers: int) -> int:
    """LAVIS EVA get_num_layer: embeddings 0, block i -> i+1, anything else num_layers."""
    parts = name.split(".")
    for key in ("blocks", "resblocks"):
        if key in parts:
            idx = parts.index(key)
            if idx + 1 < len(parts) and parts[idx + 1].isdigit():
                return int(parts[idx + 1]) + 1
    embed_names = ("cls_token", "pos_embed", "patch_embed", "class_embedding", "positional_embedding", "conv1", "ln_pre")
    if any(p in embed_names for p in parts):
        return 0
    return num_layers

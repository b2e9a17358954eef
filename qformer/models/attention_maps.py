"""Where the queries look: the last cross-attention layer's attention of each query over the image tokens.

The Q-Former's attention runs through `scaled_dot_product_attention`, which never materialises the
probabilities, so this module recomputes them for the few images asked about: one extra query pass
(`encode_image`), during which a forward pre-hook on the last cross-attention module records its
inputs (the query hidden states and the image embeddings); the probabilities are then
softmax(Q K^T / sqrt(head_dim)) of that module's own projections, averaged over heads. The normal
forward and evaluation paths are untouched (no hook, no extra work) unless this is called.
"""
from __future__ import annotations

import contextlib
import inspect
import math

import torch
from torch import nn


def last_cross_attention(model: nn.Module) -> nn.Module:
    """The BertSelfAttention of the Q-Former's last layer that has cross-attention."""
    core = getattr(model, "module", model)  # DDP-wrapped in the training loop
    layers = [layer for layer in core.Qformer.bert.encoder.layer if layer.has_cross_attention]
    if not layers:
        raise ValueError("the Q-Former has no cross-attention layer")
    return layers[-1].crossattention.self


def cross_attention_probs(model: nn.Module, image: torch.Tensor, autocast_dtype: torch.dtype | None = None
                          ) -> torch.Tensor:
    """[B, heads, queries, image tokens] attention probabilities (rows sum to 1) of the last cross-attention
    layer for normalised images [B,3,S,S]. Runs in eval mode without gradients; the pass runs under
    `autocast_dtype` as the evaluation does (an fp16 ViT needs it on CUDA), the probabilities in fp32."""
    core = getattr(model, "module", model)
    attn = last_cross_attention(core)
    signature = inspect.signature(attn.forward)
    seen: dict[str, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = signature.bind(*args, **kwargs)
        seen["hidden"] = bound.arguments["hidden_states"]
        seen["image"] = bound.arguments["encoder_hidden_states"]

    was_training = core.training
    core.eval()
    handle = attn.register_forward_pre_hook(record, with_kwargs=True)
    try:
        cast = torch.autocast(image.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with torch.no_grad():
            with cast:
                core.encode_image(image=image)
            q = attn._heads(_linear(attn.query, seen["hidden"]))
            k = attn._heads(_linear(attn.key, seen["image"]))
            return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim), dim=-1)
    finally:
        handle.remove()
        core.train(was_training)


def query_cross_attention(model: nn.Module, image: torch.Tensor, autocast_dtype: torch.dtype | None = None
                          ) -> torch.Tensor:
    """[B, queries, image tokens]: `cross_attention_probs` averaged over heads."""
    return cross_attention_probs(model, image, autocast_dtype).mean(dim=1)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())


def patch_grid(attention: torch.Tensor) -> torch.Tensor:
    """[..., N tokens] -> [..., g, g]: drops the prefix tokens (CLS, registers) before the square patch grid."""
    n = attention.shape[-1]
    side = math.isqrt(n)
    if side * side != n:
        side = math.isqrt(n - 1)
    prefix = n - side * side
    if side == 0 or prefix > 8:
        raise ValueError(f"{n} image tokens are not a square patch grid after a few prefix tokens")
    return attention[..., prefix:].reshape(*attention.shape[:-1], side, side)

"""Query attention maps: the last cross-attention layer's real probabilities, shaped queries x image grid."""
from __future__ import annotations

import torch

from helpers import small_model


def test_maps_are_the_layers_attention_and_fit_the_patch_grid(tiny_bert):
    from qformer.models.attention_maps import cross_attention_probs, last_cross_attention, patch_grid, \
        query_cross_attention

    model = small_model(tiny_bert, num_query_token=4)  # 32 px, 8 px patches: CLS + 4x4 grid
    torch.manual_seed(1)
    image = torch.randn(3, 3, 32, 32)
    attn = last_cross_attention(model)
    layers = [layer for layer in model.Qformer.bert.encoder.layer if layer.has_cross_attention]
    assert attn is layers[-1].crossattention.self and len(layers) >= 2  # the last of several

    # what the layer really computed (SDPA) in a normal pass, and its value projections
    seen = {}
    hook = attn.register_forward_hook(lambda m, args, out: seen.update(context=out[0], v=out[1][1]))
    with torch.no_grad():
        model.encode_image(image=image)
    hook.remove()

    probs = cross_attention_probs(model, image)
    b, heads, q, n = probs.shape
    assert (b, heads, q, n) == (3, attn.num_heads, 4, 17)
    assert torch.allclose(probs.sum(-1), torch.ones(b, heads, q), atol=1e-5)
    # probabilities x values reproduce the layer's output: these are the weights the layer used
    context = (probs @ seen["v"].float()).transpose(1, 2).reshape(b, q, -1)
    assert torch.allclose(context, seen["context"].float(), atol=1e-5)
    assert not attn._forward_pre_hooks  # the recording hook is gone: later passes are untouched

    maps = patch_grid(query_cross_attention(model, image))
    assert maps.shape == (3, 4, 4, 4)  # images x queries x grid x grid (CLS dropped)
    assert torch.allclose(maps, probs.mean(1)[..., 1:].reshape(3, 4, 4, 4))

    # in the evaluation's precision (bf16 autocast): fp32 probabilities, close to the fp32 ones
    low = query_cross_attention(model, image, autocast_dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and torch.allclose(low.sum(-1), torch.ones(3, 4), atol=1e-5)
    assert torch.allclose(low, probs.mean(1), atol=0.02)


def test_patch_grid_finds_the_prefix():
    from qformer.models.attention_maps import patch_grid

    assert patch_grid(torch.zeros(2, 257)).shape == (2, 16, 16)  # EVA ViT-g: CLS + 16x16
    assert patch_grid(torch.zeros(64)).shape == (8, 8)  # no CLS
    assert patch_grid(torch.zeros(5, 1 + 4 + 49)).shape == (5, 7, 7)  # CLS + 4 registers

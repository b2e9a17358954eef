"""The frozen ViT in fp16 as LAVIS runs it: which parameters become half, the dtype of EVA's residual stream
under fp16 autocast, resized position tables from fp16 weight files, and the error against fp32 that
follows (CPU fp16 autocast; the full-depth figure is `qformer bench vit-precision`)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from qformer.models.vision import build_vision_encoder, load_vision_weights
from qformer.models.vision.weights import convert_weights_to_fp16, interpolate_pos_embed

TINY_EVA = {"embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 4.3637, "patch_size": 8}
TINY_CLIP = {"width": 32, "layers": 2, "heads": 2, "patch_size": 8}


def lavis_order_eva(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """EVA's forward in the order of LAVIS's `eva_vit.py` on our parameters: nothing cast by hand, attention
    as an explicit softmax. Autocast decides every dtype, as it does for LAVIS."""
    x = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed
    for block in vit.blocks:
        attn = block.attn
        h = block.norm1(x)
        b, n, c = h.shape
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
        qkv = F.linear(h, attn.qkv.weight, bias).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // attn.num_heads) ** -0.5, qkv[1], qkv[2]
        weights = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c))
        x = x + block.mlp.fc2(block.mlp.act(block.mlp.fc1(block.norm2(x))))
    return x


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm())


def _fp16_copy(vit: nn.Module) -> nn.Module:
    half = copy.deepcopy(vit)
    convert_weights_to_fp16(half)
    return half


def test_conversion_halves_exactly_lavis_parameters():
    """Conv/Linear weights and biases (MultiheadAttention's out_proj is a Linear); everything else stays fp32,
    MultiheadAttention's packed input projection included (LAVIS leaves it: its block for it is commented out)."""
    for name, sizes in (("eva_clip_g", TINY_EVA), ("clip_L", TINY_CLIP)):
        vit = build_vision_encoder(name, 32, vit_kwargs=sizes)
        layer_params = {f"{module_name}.{p}" for module_name, module in vit.named_modules()
                        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear))
                        for p, _ in module.named_parameters(recurse=False)}
        convert_weights_to_fp16(vit)
        halved = {n for n, p in vit.named_parameters() if p.dtype == torch.float16}
        assert halved == layer_params, name
    clip_attention = vit.transformer.resblocks[0].attn
    assert clip_attention.in_proj_weight.dtype == clip_attention.in_proj_bias.dtype == torch.float32
    assert clip_attention.out_proj.weight.dtype == torch.float16


def test_eva_residual_stream_is_fp32_under_fp16_autocast():
    """The fp32 class token and position table promote the stream (LAVIS); each block's matmuls run in fp16."""
    torch.manual_seed(0)
    vit = _fp16_copy(build_vision_encoder("eva_clip_g", 32, vit_kwargs=TINY_EVA).eval())
    seen: dict[str, torch.dtype] = {}
    vit.blocks[-1].register_forward_hook(lambda m, args, out: seen.update(stream_in=args[0].dtype, stream_out=out.dtype))
    vit.blocks[-1].mlp.fc1.register_forward_hook(lambda m, args, out: seen.update(matmul=out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = vit(torch.randn(2, 3, 32, 32))
    assert seen == {"stream_in": torch.float32, "stream_out": torch.float32, "matmul": torch.float16}
    assert out.dtype == torch.float32


def test_fp16_error_against_fp32_is_lavis_error():
    """Our fp16 features are as far from fp32 as LAVIS's order of operations makes them; a residual stream kept
    in fp16 (the class token and position table cast down: the old behaviour) is measurably further."""
    torch.manual_seed(0)
    vit = build_vision_encoder("eva_clip_g", 32, vit_kwargs=TINY_EVA).eval()
    x = torch.randn(2, 3, 32, 32)
    half = _fp16_copy(vit)
    fp16_stream = copy.deepcopy(half)
    fp16_stream.cls_token.data, fp16_stream.pos_embed.data = fp16_stream.cls_token.data.half(), fp16_stream.pos_embed.data.half()
    with torch.no_grad():
        ours_32, lavis_32 = vit(x), lavis_order_eva(vit, x)
        with torch.autocast("cpu", dtype=torch.float16):
            ours_16, lavis_16, stream_16 = half(x), lavis_order_eva(half, x), fp16_stream(x)
    assert _relative_error(ours_32, lavis_32) < 1e-5  # same network in fp32 (SDPA vs explicit softmax rounding)
    lavis_error = _relative_error(lavis_16, lavis_32)
    assert 1e-5 < lavis_error < 5e-3
    assert _relative_error(ours_16, ours_32) < 1.1 * lavis_error
    assert _relative_error(stream_16, ours_32) > 1.3 * lavis_error


def test_resized_tables_from_fp16_files_keep_lavis_dtypes(tmp_path):
    """EVA resizes an fp16 file's table in fp32 and keeps the fp32 result (not rounded to fp16 again);
    CLIP resizes in the file's dtype, as LAVIS's clip_vit.py does."""
    torch.manual_seed(0)
    eva = build_vision_encoder("eva_clip_g", 32, vit_kwargs=TINY_EVA)  # 4x4 grid
    torch.save({k: v.half() for k, v in eva.state_dict().items()}, tmp_path / "eva_fp16.pth")
    eva_48 = build_vision_encoder("eva_clip_g", 48, vit_kwargs=TINY_EVA)  # 6x6 grid
    load_vision_weights(eva_48, str(tmp_path / "eva_fp16.pth"))
    file_table = eva.pos_embed.detach().half()
    expected = interpolate_pos_embed(file_table, 36, align_corners=False, in_fp32=True)
    assert expected.dtype == torch.float32
    assert torch.equal(eva_48.pos_embed.detach(), expected)
    assert not torch.equal(expected, expected.half().float())  # values fp16 cannot hold survived

    clip = build_vision_encoder("clip_L", 32, vit_kwargs=TINY_CLIP)
    torch.save({k: v.half() for k, v in clip.state_dict().items()}, tmp_path / "clip_fp16.pth")
    clip_48 = build_vision_encoder("clip_L", 48, vit_kwargs=TINY_CLIP)
    load_vision_weights(clip_48, str(tmp_path / "clip_fp16.pth"))
    in_file_dtype = interpolate_pos_embed(clip.positional_embedding.detach().half(), 36, True, in_fp32=False)
    assert in_file_dtype.dtype == torch.float16
    assert torch.equal(clip_48.positional_embedding.detach(), in_file_dtype.float())

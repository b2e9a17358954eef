"""Vision encoders: LAVIS parameter names and shapes, weight files, pos-embed resize, freezing (fp16: test_vision_fp16)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qformer.models.vision import build_vision_encoder, load_vision_weights
from qformer.models.vision.clip_vit import QuickGELU
from qformer.models.vision.weights import interpolate_pos_embed

TINY_EVA = {"embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_size": 8}
TINY_CLIP = {"width": 16, "layers": 2, "heads": 2, "patch_size": 8}


def test_full_size_eva_vit_g_matches_spec_on_meta():
    with torch.device("meta"):
        vit = build_vision_encoder("eva_clip_g", 224)
    sd = vit.state_dict()
    assert vit.num_features == 1408 and len(vit.blocks) == 39
    expected = {
        "cls_token": (1, 1, 1408), "pos_embed": (1, 257, 1408), "patch_embed.proj.weight": (1408, 3, 14, 14),
        "blocks.38.attn.qkv.weight": (4224, 1408), "blocks.38.attn.q_bias": (1408,), "blocks.38.attn.v_bias": (1408,),
        "blocks.0.mlp.fc1.weight": (6144, 1408), "blocks.0.mlp.fc2.weight": (1408, 6144), "blocks.0.norm1.weight": (1408,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "blocks.39.norm1.weight" not in sd and "norm.weight" not in sd and "blocks.0.attn.qkv.bias" not in sd
    assert vit.blocks[0].attn.num_heads == 16 and vit.blocks[0].norm1.eps == 1e-6


def test_full_size_clip_L_matches_spec_on_meta():
    with torch.device("meta"):
        vit = build_vision_encoder("clip_L", 224)
    sd = vit.state_dict()
    assert vit.num_features == 1024 and len(vit.transformer.resblocks) == 23
    assert tuple(sd["positional_embedding"].shape) == (257, 1024)
    assert tuple(sd["class_embedding"].shape) == (1024,)
    assert tuple(sd["conv1.weight"].shape) == (1024, 3, 14, 14) and "conv1.bias" not in sd
    assert tuple(sd["transformer.resblocks.22.attn.in_proj_weight"].shape) == (3072, 1024)
    assert tuple(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape) == (4096, 1024)
    assert "ln_pre.weight" in sd and "ln_post.weight" not in sd and "proj" not in sd
    assert isinstance(vit.transformer.resblocks[0].mlp.gelu, QuickGELU)


@pytest.mark.parametrize("name,sizes", [("eva_clip_g", TINY_EVA), ("clip_L", TINY_CLIP)])
def test_tiny_encoders_load_a_saved_state_dict_file(tmp_path, name, sizes):
    torch.manual_seed(0)
    src = build_vision_encoder(name, 32, vit_kwargs=sizes).eval()
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    dst = build_vision_encoder(name, 32, vit_kwargs=sizes).eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(src(x), dst(x))
    report = load_vision_weights(dst, str(path))
    assert report == {"missing": [], "unexpected": []}
    out = dst(x)
    assert out.shape == (2, 17, src.num_features) and torch.allclose(src(x), out)


def test_eva_weights_at_another_resolution_are_interpolated(tmp_path):
    torch.manual_seed(0)
    src = build_vision_encoder("eva_clip_g", 32, vit_kwargs=TINY_EVA)  # 4x4 grid
    torch.save({"model": src.state_dict()}, tmp_path / "vit.pth")
    dst = build_vision_encoder("eva_clip_g", 48, vit_kwargs=TINY_EVA)  # 6x6 grid
    load_vision_weights(dst, str(tmp_path / "vit.pth"))
    assert dst.pos_embed.shape == (1, 37, 24)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # CLS row kept
    assert dst(torch.randn(1, 3, 48, 48)).shape == (1, 37, 24)


def test_interpolate_pos_embed_keeps_same_size_and_resizes_2d_tables():
    table = torch.randn(1, 17, 4)
    assert interpolate_pos_embed(table, 16, False, in_fp32=True) is table
    out = interpolate_pos_embed(torch.randn(17, 4), 9, True, in_fp32=False)
    assert out.shape == (10, 4)


def test_weight_file_errors_name_the_key(tmp_path):
    vit = build_vision_encoder("eva_clip_g", 32, vit_kwargs=TINY_EVA)
    with pytest.raises(ValueError, match="model.vit_weights"):
        load_vision_weights(vit, str(tmp_path / "missing.pth"))
    other = build_vision_encoder("eva_clip_g", 32, vit_kwargs={**TINY_EVA, "embed_dim": 32})
    torch.save(other.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_vision_weights(vit, str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="model.vit_model"):
        build_vision_encoder("resnet50")


def test_timm_encoder_returns_all_tokens():
    vit = build_vision_encoder("timm:vit_tiny_patch16_224", vit_kwargs={"img_size": 32, "patch_size": 8, "depth": 1})
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 17, 192) and vit.num_features == 192
    with pytest.raises(ValueError, match="timm:"):
        build_vision_encoder("timm:vit_tiny_patch16_224", vit_kwargs={"no_such_kwarg": 1})


def test_eva_drop_path_is_linearly_spaced():
    vit = build_vision_encoder("eva_clip_g", 32, drop_path_rate=0.2, vit_kwargs={**TINY_EVA, "depth": 3})
    assert [b.drop_path.p for b in vit.blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert isinstance(vit.blocks[0].mlp.act, nn.GELU)

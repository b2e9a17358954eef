"""Build the image encoder named by `model.vit_model` and load `model.vit_weights` into it."""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from qformer.models.vision.clip_vit import ClipVisionTransformer, create_clip_vit_L
from qformer.models.vision.eva_vit import EvaVisionTransformer, create_eva_vit_g
from qformer.models.vision.timm_vit import TimmEncoder
from qformer.models.vision.weights import convert_weights_to_fp16, interpolate_pos_embed, read_weights

log = logging.getLogger(__name__)


def build_vision_encoder(
    vit_model: str,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    use_grad_checkpoint: bool = False,
    vit_kwargs: dict | None = None,
) -> nn.Module:
    """Every encoder exposes `num_features` and maps [B,3,S,S] -> [B, tokens, num_features].

    For `eva_clip_g`/`clip_L`, `vit_kwargs` overrides sizes (embed_dim/depth/... or width/layers/...).
    """
    kwargs = dict(vit_kwargs or {})
    if vit_model in ("eva_clip_g", "clip_L") and "img_size" in kwargs:
        # model.image_size decides for the LAVIS encoders (a merged-in timm img_size must not clash)
        if kwargs.pop("img_size") != img_size:
            log.warning("model.vit_kwargs.img_size ignored for %s; using model.image_size=%d", vit_model, img_size)
    if vit_model == "eva_clip_g":
        return create_eva_vit_g(img_size, drop_path_rate, use_grad_checkpoint, **kwargs)
    if vit_model == "clip_L":
        return create_clip_vit_L(img_size, use_grad_checkpoint, **kwargs)
    if vit_model.startswith("timm:"):
        return TimmEncoder(vit_model[5:], drop_path_rate=drop_path_rate, use_grad_checkpoint=use_grad_checkpoint, **kwargs)
    raise ValueError(f"model.vit_model={vit_model!r}: expected eva_clip_g, clip_L or timm:<name>")


def load_vision_weights(encoder: nn.Module, source: str) -> dict[str, list[str]]:
    """Load a ViT state dict (LAVIS names) non-strictly; position tables are resized to the image size."""
    state = read_weights(source)
    if isinstance(encoder, EvaVisionTransformer) and "pos_embed" in state:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], encoder.patch_embed.num_patches, False, in_fp32=True)
    if isinstance(encoder, ClipVisionTransformer) and "positional_embedding" in state:
        state["positional_embedding"] = interpolate_pos_embed(state["positional_embedding"], encoder.num_patches, True, in_fp32=False)
    if isinstance(encoder, TimmEncoder) and not any(k.startswith("model.") for k in state):
        state = {f"model.{k}": v for k, v in state.items()}
    ours = encoder.state_dict()
    bad = [k for k, v in state.items() if k in ours and ours[k].shape != v.shape]
    if bad:
        raise ValueError(f"model.vit_weights={source}: shape mismatch for {bad[:5]} (wrong vit_model or image_size?)")
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys:
        log.warning("ViT weights %s: %d missing keys, e.g. %s", source, len(result.missing_keys), result.missing_keys[:3])
    if result.unexpected_keys:
        log.info("ViT weights %s: %d unused keys, e.g. %s", source, len(result.unexpected_keys), result.unexpected_keys[:3])
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


def maybe_fp16(encoder: nn.Module, vit_precision: str, on_cpu: bool = False) -> bool:
    """LAVIS converts Linear/Conv weights to fp16 for `vit_precision: fp16`. We do it where CUDA exists to
    run them, and on a CPU-only machine only when asked (`on_cpu`: a run with fp16 autocast, which then
    tests the GPU's parameter dtypes); otherwise the ViT stays fp32 on the CPU (faster and exact there)."""
    if vit_precision not in ("fp16", "fp32"):
        raise ValueError(f"model.vit_precision must be fp16 or fp32, got {vit_precision!r}")
    if vit_precision == "fp16" and (torch.cuda.is_available() or on_cpu):
        convert_weights_to_fp16(encoder)
        return True
    return False


def fp16_vit_autocast(vit_fp16: bool, device_type: str) -> contextlib.AbstractContextManager:
    """Where an fp16 ViT runs: under fp16 autocast, as in LAVIS (which runs the whole step under it). Turned on
    when the caller has none, and also inside a bf16 step, which would otherwise re-cast every fp16 weight to
    bf16 on each call (a round trip that costs time and precision)."""
    if vit_fp16 and not (torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16):
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()

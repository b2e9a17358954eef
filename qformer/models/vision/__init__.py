"""Frozen image encoders: `eva_clip_g`, `clip_L` and `timm:<name>` (see build.py)."""
from qformer.models.vision.build import build_vision_encoder, load_vision_weights

__all__ = ["build_vision_encoder", "load_vision_weights"]

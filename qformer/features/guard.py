"""Check, in the training worker, that the model's frozen ViT is the one that made the cache.

The manifest's settings catch a different encoder or weights file; this also catches a randomly
initialised ViT (`model.vit_weights: null`) built under another seed, whose features would be
silently different. Call after the model is built (and, under DDP, after prepare_model).
"""
from __future__ import annotations

from typing import Any

from qformer.core.errors import ConfigError
from qformer.features.encoder import vit_fingerprint
from qformer.features.reader import open_cache


def check_model(model: Any, cfg: Any) -> None:
    """Raise ConfigError (key run.vision_cache) unless model.visual_encoder matches the cache."""
    cache_dir, manifest = open_cache(cfg)
    expected = manifest.get("vit_fingerprint")
    if not expected:
        return  # a cache written without a fingerprint: settings were already checked
    module = getattr(model, "module", model)  # DDP-wrapped or not
    actual = vit_fingerprint(module.visual_encoder)
    if actual != expected:
        raise ConfigError(
            f"the model's ViT weights differ from those that made the feature cache at {cache_dir} "
            f"(fingerprint {actual} vs {expected}); with model.vit_weights null the ViT is random and "
            f"depends on run.seed: rebuild the cache with this config", key="run.vision_cache")

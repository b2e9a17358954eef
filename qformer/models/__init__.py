"""BLIP-2 stage-1 model: Q-Former BERT, vision encoders, losses, Blip2Qformer (arch "blip2")."""
from __future__ import annotations

from typing import Any, Mapping

from qformer.core.errors import ConfigError
from qformer.core.registry import get_model_class
from qformer.models.blip2_qformer import Blip2Output, Blip2Qformer


def build_model(model_cfg: Mapping[str, Any], **build_options: Any):
    """`model.arch` -> registered class -> `from_config(model_cfg, **build_options)` (options the run, not the
    model section, decides: e.g. `vit_fp16_on_cpu`)."""
    arch = model_cfg.get("arch") if hasattr(model_cfg, "get") else None
    if not arch:
        raise ConfigError("model.arch is required")
    return get_model_class(str(arch)).from_config(model_cfg, **build_options)


__all__ = ["Blip2Output", "Blip2Qformer", "build_model"]

"""Processors by registry name (LAVIS names): text `blip_caption`; images `blip2_image_train`,
`blip_image_train`, `blip_image_eval`. Build one from a config node with `build_processor`."""
from __future__ import annotations

from qformer.data.processors.image import (  # noqa: F401  (registers)
    CLIP_MEAN,
    CLIP_STD,
    Blip2ImageTrainProcessor,
    BlipImageEvalProcessor,
    BlipImageTrainProcessor,
)
from qformer.data.processors.text import BlipCaptionProcessor, pre_caption  # noqa: F401
from qformer.core.registry import get_processor_class


def build_processor(cfg):
    """`{name: <registry name>, ...kwargs}` -> processor; None/empty -> None (as LAVIS)."""
    if cfg is None or not cfg.get("name"):
        return None
    return get_processor_class(str(cfg["name"])).from_config(cfg)

"""`blip_caption`: LAVIS's BlipCaptionProcessor (prompt + pre_caption), character for character."""
from __future__ import annotations

import re

from qformer.core.registry import register_processor

# Only these characters are removed; commas, apostrophes, hyphens and '?' survive (spec §2.5).
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


@register_processor("blip_caption")
class BlipCaptionProcessor:
    def __init__(self, prompt: str = "", max_words: int = 50):
        self.prompt = prompt
        self.max_words = int(max_words)

    def __call__(self, caption: str) -> str:
        return self.prompt + pre_caption(caption, self.max_words)

    @classmethod
    def from_config(cls, cfg=None) -> "BlipCaptionProcessor":
        cfg = cfg or {}
        return cls(prompt=cfg.get("prompt", ""), max_words=cfg.get("max_words", 50))

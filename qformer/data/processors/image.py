"""Image processors (LAVIS blip_processors.py): crop/flip/RandAugment/resize producing uint8 CHW.

Outputs are uint8 [3,S,S] NumPy arrays, i.e. LAVIS's `ToTensor()` result times 255 before
`Normalize`: normalisation happens on the training device (`qformer.data.normalize`), so the
object store carries 1 byte per pixel instead of 4. Randomness comes from an explicit
`np.random.Generator` so tests and workers control it.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from qformer.data.processors.randaugment import DEFAULT_AUGS, RandomAugment
from qformer.core.registry import register_processor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_default_rng = np.random.default_rng()


def to_chw_uint8(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: 10 tries, then a centre crop. Returns (top, left, h, w)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _ImageProcessor:
    def __init__(self, image_size: int, mean=None, std=None):
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in (mean if mean is not None else CLIP_MEAN))
        self.std = tuple(float(v) for v in (std if std is not None else CLIP_STD))

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        raise NotImplementedError


@register_processor("blip2_image_train")
class Blip2ImageTrainProcessor(_ImageProcessor):
    """RandomResizedCrop(S, scale=(min,max), ratio (3/4,4/3), BICUBIC) -> RandomHorizontalFlip(0.5)."""

    default_size = 364

    def __init__(self, image_size: int = 364, mean=None, std=None, min_scale: float = 0.5, max_scale: float = 1.0):
        super().__init__(image_size, mean, std)
        self.scale = (float(min_scale), float(max_scale))
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)

    def crop_flip(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        top, left, h, w = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, rng)
        size = (self.image_size, self.image_size)
        # crop first, then resize (as torchvision): a resize `box` would let the filter see outside pixels
        img = img.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        return to_chw_uint8(self.crop_flip(img, rng or _default_rng))

    @classmethod
    def from_config(cls, cfg=None):
        cfg = cfg or {}
        return cls(
            image_size=cfg.get("image_size", cls.default_size),
            mean=cfg.get("mean", None),
            std=cfg.get("std", None),
            min_scale=cfg.get("min_scale", 0.5),
            max_scale=cfg.get("max_scale", 1.0),
        )


@register_processor("blip_image_train")
class BlipImageTrainProcessor(Blip2ImageTrainProcessor):
    """The same crop/flip, then RandAugment(2 ops, M=5) over LAVIS's ten ops."""

    default_size = 384

    def __init__(self, image_size: int = 384, mean=None, std=None, min_scale: float = 0.5, max_scale: float = 1.0):
        super().__init__(image_size, mean, std, min_scale, max_scale)
        self.randaugment = RandomAugment(2, 5, DEFAULT_AUGS)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng or _default_rng
        return to_chw_uint8(self.randaugment(self.crop_flip(img, rng), rng))


@register_processor("blip_image_eval")
class BlipImageEvalProcessor(_ImageProcessor):
    """Resize((S,S), BICUBIC): no crop, aspect ratio not preserved."""

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        return to_chw_uint8(img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC))

    @classmethod
    def from_config(cls, cfg=None):
        cfg = cfg or {}
        return cls(image_size=cfg.get("image_size", 384), mean=cfg.get("mean", None), std=cfg.get("std", None))

"""Image processors (LAVIS blip_processors.py): crop/flip/RandAugment/resize producing uint8 CHW.

Outputs are uint8 [3,S,S] NumPy arrays, i.e. LAVIS's `ToTensor()` result times 255 before
`Normalize`: normalisation happens on the training device (`qformer.data.normalize`), so the
object store carries 1 byte per pixel instead of 4. Randomness comes from an explicit
`np.random.Generator` so tests and workers control it.

Two ways to get there from an encoded image (`process`): exact, LAVIS's pixels (decode everything,
crop, bicubic resize); or, with `reduced_decode` (run.data.train_decode / run.data.eval_decode),
decode only as many pixels as the output needs: the crop box is drawn first from the header's size
(the same random draws, so the same box and flip), the JPEG is decoded at 1/2, 1/4 or 1/8 scale
where the box still keeps at least the output size, and the box is cropped, resized (antialiased
bicubic, torch's uint8 kernel) and flipped in one pass over uint8. The two differ by resampling
only (docs/performance.md gives the mean absolute pixel difference).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from qformer.data.images import EncodedImage
from qformer.data.processors.randaugment import DEFAULT_AUGS, RandomAugment
from qformer.core.registry import register_processor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_default_rng = np.random.default_rng()


def to_chw_uint8(img: Image.Image) -> np.ndarray:
    rgb = img if img.mode == "RGB" else img.convert("RGB")  # convert copies even an RGB image
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))


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


DRAFT_FACTORS = (8, 4, 2)  # the JPEG DCT scalings PIL's `draft` offers


def reduction_factor(width: float, height: float, size: int) -> int:
    """The largest JPEG draft factor that leaves a `width` x `height` region at least `size` pixels on
    each side (1: decode whole)."""
    return next((f for f in DRAFT_FACTORS if width / f >= size and height / f >= size), 1)


def resized_crop(img: Image.Image, box: tuple[float, float, float, float], size: int, flip: bool) -> np.ndarray:
    """uint8 [3,size,size]: `box` (left, top, right, bottom) of an RGB `img`, resized with antialiased bicubic
    by torch's uint8 kernel (~6x faster than PIL's resize at 224 px, and equal to it within one grey level:
    mean difference 0.002), flipped left-right if `flip`. The box is rounded to whole pixels of `img`: after a
    draft decode that moves an edge by at most half a decoded pixel."""
    import torch  # lazy: `qformer config` validates processors and must start without torch
    import torch.nn.functional as F

    box = tuple(int(round(v)) for v in box)
    hwc = torch.from_numpy(np.array(img.crop(box)))  # only the box leaves PIL (np.array: writable, as torch wants)
    crop = hwc.permute(2, 0, 1).unsqueeze(0)  # a channels-last view: torch's fast uint8 path
    out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]
    if flip:
        out = out.flip(-1)
    return out.contiguous().numpy()


class _ImageProcessor:
    def __init__(self, image_size: int, mean=None, std=None):
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in (mean if mean is not None else CLIP_MEAN))
        self.std = tuple(float(v) for v in (std if std is not None else CLIP_STD))
        # set from run.data.train_decode / eval_decode by the builder; False: LAVIS's exact pixels
        self.reduced_decode = False

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        raise NotImplementedError

    def process(self, encoded: EncodedImage, rng: np.random.Generator | None = None) -> np.ndarray:
        """An encoded image -> uint8 [3,S,S]: exact, or decoding only what the output needs (`reduced_decode`)."""
        return self(encoded.decode(), rng)


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
        return self._flip(img, rng)

    def reduced_crop_flip(self, encoded: EncodedImage, rng: np.random.Generator) -> np.ndarray:
        """`crop_flip` from the encoded image as uint8 [3,S,S], decoding at the largest JPEG draft factor that
        keeps the crop box at least image_size pixels on each side; the same random draws, in the same order."""
        top, left, h, w = random_resized_crop_box(*encoded.size, self.scale, self.ratio, rng)
        img, f = encoded.decode_reduced(reduction_factor(w, h, self.image_size))
        box = (left / f, top / f, (left + w) / f, (top + h) / f)
        return resized_crop(img, box, self.image_size, flip=rng.random() < 0.5)

    @staticmethod
    def _flip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        return to_chw_uint8(self.crop_flip(img, rng or _default_rng))

    def process(self, encoded: EncodedImage, rng: np.random.Generator | None = None) -> np.ndarray:
        if not self.reduced_decode:
            return super().process(encoded, rng)
        return self.reduced_crop_flip(encoded, rng or _default_rng)

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

    def process(self, encoded: EncodedImage, rng: np.random.Generator | None = None) -> np.ndarray:
        if not self.reduced_decode:
            return _ImageProcessor.process(self, encoded, rng)
        rng = rng or _default_rng
        chw = self.reduced_crop_flip(encoded, rng)  # RandAugment's ops are PIL's: back to an image for them
        return to_chw_uint8(self.randaugment(Image.fromarray(chw.transpose(1, 2, 0)), rng))


@register_processor("blip_image_eval")
class BlipImageEvalProcessor(_ImageProcessor):
    """Resize((S,S), BICUBIC): no crop, aspect ratio not preserved."""

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        return to_chw_uint8(img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC))

    def process(self, encoded: EncodedImage, rng: np.random.Generator | None = None) -> np.ndarray:
        if not self.reduced_decode:
            return super().process(encoded, rng)
        width, height = encoded.size
        img, f = encoded.decode_reduced(reduction_factor(width, height, self.image_size))
        return resized_crop(img, (0, 0, img.width, img.height), self.image_size, flip=False)

    @classmethod
    def from_config(cls, cfg=None):
        cfg = cfg or {}
        return cls(image_size=cfg.get("image_size", 384), mean=cfg.get("mean", None), std=cfg.get("std", None))

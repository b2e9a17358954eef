"""RandAugment as LAVIS's `RandomAugment(N=2, M=5, isPIL=True, augs=[...])` (spec §2.5), on PIL.

LAVIS runs its ops on NumPy/OpenCV; these are the same ops on PIL images: AutoContrast and Equalize
ARE Pillow's (LAVIS's OpenCV versions re-implement them), the affine ops use bilinear sampling with
fill (128,128,128) like `cv2.warpAffine(..., borderValue=fill)`. At M=5 Brightness and Sharpness get
factor (5/10)*1.8+0.1 = 1.0, i.e. they are exact no-ops, as in LAVIS.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL = (128, 128, 128)
TRANSLATE_CONST = 10.0
DEFAULT_AUGS = (
    "Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)


def _signed(value: float, rng: np.random.Generator) -> float:
    # LAVIS: `if np.random.random() > 0.5: level = -level`
    return -value if rng.random() > 0.5 else value


def _affine(img: Image.Image, inverse: tuple[float, ...]) -> Image.Image:
    # PIL takes the output->input map; cv2.warpAffine takes input->output and inverts it.
    return img.transform(img.size, Image.Transform.AFFINE, inverse, Image.Resampling.BILINEAR, fillcolor=FILL)


def _enhance(enhancer) -> Callable[[Image.Image, float, np.random.Generator], Image.Image]:
    def op(img: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
        factor = (level / MAX_LEVEL) * 1.8 + 0.1
        return img if factor == 1.0 else enhancer(img).enhance(factor)

    return op


def _shear_x(img: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    f = _signed(level / MAX_LEVEL * 0.3, rng)
    return _affine(img, (1, -f, 0, 0, 1, 0))


def _shear_y(img: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    f = _signed(level / MAX_LEVEL * 0.3, rng)
    return _affine(img, (1, 0, 0, -f, 1, 0))


def _translate_x(img: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    # LAVIS: M = [[1, 0, -offset], [0, 1, 0]] (content moves left by `offset` px)
    offset = _signed(level / MAX_LEVEL * TRANSLATE_CONST, rng)
    return _affine(img, (1, 0, offset, 0, 1, 0))


def _translate_y(img: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    offset = _signed(level / MAX_LEVEL * TRANSLATE_CONST, rng)
    return _affine(img, (1, 0, 0, 0, 1, offset))


def _rotate(img: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    degrees = _signed(level / MAX_LEVEL * 30.0, rng)  # counter-clockwise, like cv2.getRotationMatrix2D
    return img.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=FILL)


OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "Identity": lambda img, level, rng: img,
    "AutoContrast": lambda img, level, rng: ImageOps.autocontrast(img, cutoff=0),
    "Equalize": lambda img, level, rng: ImageOps.equalize(img),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
}


class RandomAugment:
    """Sample N op names uniformly WITH replacement; apply each with probability 0.5 at level M."""

    def __init__(self, n: int = 2, m: float = 5, augs: tuple[str, ...] = DEFAULT_AUGS):
        unknown = [a for a in augs if a not in OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {sorted(OPS)}")
        self.n, self.m, self.augs = int(n), float(m), tuple(augs)

    def sample_ops(self, rng: np.random.Generator) -> list[str]:
        return [self.augs[i] for i in rng.integers(0, len(self.augs), size=self.n)]

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for name in self.sample_ops(rng):
            if rng.random() > 0.5:  # LAVIS: `if np.random.random() > prob: continue`
                continue
            img = OPS[name](img, self.m, rng)
        return img

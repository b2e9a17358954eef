"""The K views cached per image: view 0 is the eval transform, views 1..K-1 the train transform.

Each train view draws from its own generator seeded by (seed, image index, view), so a cache is
reproducible and rerunning the job for one image gives the same crops.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

ImageTransform = Callable[..., np.ndarray]  # (PIL image, rng=None) -> uint8 [3,S,S]


class ViewMaker:
    """Picklable: `(PIL image, image index) -> uint8 [K,3,S,S]`."""

    def __init__(self, eval_transform: ImageTransform, train_transform: ImageTransform | None, views: int, seed: int):
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        if views > 1 and train_transform is None:
            raise ValueError("views > 1 needs a train image transform")
        self.eval_transform, self.train_transform = eval_transform, train_transform
        self.views, self.seed = int(views), int(seed)

    def rng(self, image_index: int, view: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(image_index), int(view)])

    def __call__(self, img: Image.Image, image_index: int) -> np.ndarray:
        out = [self.eval_transform(img)]
        for view in range(1, self.views):
            out.append(self.train_transform(img, rng=self.rng(image_index, view)))
        shapes = {a.shape for a in out}
        if len(shapes) != 1:
            raise ValueError(f"eval and train transforms give different shapes {sorted(shapes)}; "
                             "their image_size must match model.image_size")
        return np.stack(out).astype(np.uint8, copy=False)


def train_view_for(epoch: int, views: int, seed: int = 0) -> int:
    """The train view an epoch uses when the loop rebuilds its dataset per epoch (deterministic)."""
    if views <= 1:
        return 0
    return 1 + int(np.random.default_rng([int(seed), int(epoch)]).integers(0, views - 1))

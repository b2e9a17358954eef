"""A val/test split in LAVIS's RetrievalEvalDataset layout, plus ways to get its eval images."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from qformer.data.images import DEFAULT_MAX_PIXELS
from qformer.data.processors.image import CLIP_MEAN, CLIP_STD
from qformer.data.transform import eval_batch


@dataclass
class RetrievalSplit:
    """One record per image; texts flattened in file order.

    img2txt[i] lists the indices into `texts` of image i's captions; txt2img[t] is caption t's image.
    `image_ids` follow COCOCapEvalDataset (derived from the file name). `images(...)` / `ray_dataset()`
    yield eval-processed uint8 [3,S,S] images; an undecodable image is skipped and counted, so its
    index is simply absent (callers must key results by `index`, not by position).
    """

    name: str  # builder name, e.g. coco_caption
    split: str
    image_paths: list[str]
    texts: list[str]
    img2txt: list[list[int]]
    txt2img: list[int]
    image_ids: list[str]
    image_size: int
    vis_processor: object = field(repr=False, default=None)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __len__(self) -> int:
        return len(self.image_paths)

    def images(self, batch_size: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Single-process iterator: (indices int64 [b], images uint8 [b,3,S,S]) in index order."""
        for start in range(0, len(self.image_paths), batch_size):
            idx = np.arange(start, min(start + batch_size, len(self.image_paths)), dtype=np.int64)
            out = eval_batch(
                {"index": idx, "path": np.array(self.image_paths[start:start + len(idx)], dtype=object)},
                self.vis_processor, self.max_pixels,
            )
            yield out["index"], out["image"]

    def ray_dataset(self, batch_size: int = 64, concurrency=None, num_cpus: float = 1.0):
        """A Ray Dataset of rows {"index": int64, "image": uint8 [3,S,S]} (order not guaranteed)."""
        import ray.data  # lazy: `qformer config` imports this module (the builders do) and must not import Ray

        n_blocks = max(1, min(len(self.image_paths) // max(batch_size, 1), 200))
        ds = ray.data.from_items(
            [{"index": i, "path": p} for i, p in enumerate(self.image_paths)], override_num_blocks=n_blocks
        )
        kwargs = {"compute": ray.data.TaskPoolStrategy(size=int(concurrency))} if concurrency else {}
        return ds.map_batches(
            eval_batch, fn_kwargs={"processor": self.vis_processor, "max_pixels": self.max_pixels},
            batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus, **kwargs,
        )

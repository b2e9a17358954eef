"""What an image-text shard dataset is, as configured: formats, keys, the shard list. No Ray here, so
that `qformer config` (which builds dataset builders) stays light; the Ray Data source that reads these
is qformer.data.shard_source.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMATS = ("wds", "parquet", "jsonl", "csv")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_KEYS = {  # (text_key, image_key) as img2dataset writes them; manifests: LAVIS's annotation names
    "wds": ("txt", None),  # image: the first of WDS_IMAGE_EXTS present; caption: .txt, else .json's "caption"
    "parquet": ("caption", "jpg"),
    "jsonl": ("caption", "image"),
    "csv": ("caption", "image"),
}
_SUFFIX_FORMAT = {".tar": "wds", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}


def infer_format(name: str) -> str | None:
    for suffix, fmt in _SUFFIX_FORMAT.items():
        if name.endswith(suffix):
            return fmt
    return None


@dataclass(frozen=True)
class ShardSet:
    """One shard dataset as configured (datasets.<name>.build_info)."""

    name: str
    format: str
    shards: tuple[str, ...]
    text_key: str
    image_key: str | None
    image_root: str | None = None  # manifests/parquet path columns resolve against it
    parts_per_epoch: int = 1
    endpoint: str | None = None
    num_samples: int | None = None

    def part(self, pass_: int) -> np.ndarray:
        """Indices of the shards this pass reads (shard i is in part i % parts_per_epoch)."""
        parts = max(1, self.parts_per_epoch)
        return np.arange(pass_ % parts, len(self.shards), parts)

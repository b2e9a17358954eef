"""What an image-text shard dataset is, as configured: formats, keys, the shard list. No Ray here, so
that `qformer config` (which builds dataset builders) stays light; the Ray Data source that reads these
is qformer.data.shard_source.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qformer.core.errors import ConfigError
from qformer.data.storage import expand, is_uri

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


def expand_shard_set(name: str, specs: list[str], key: str, *, fmt: str | None = None, text_key: str | None = None,
                     image_key: str | None = None, image_root: str | None = None, endpoint: str | None = None,
                     parts_per_epoch: int = 1, num_samples: int | None = None) -> ShardSet:
    """Shard specs (patterns, globs; paths already absolute) -> the ShardSet, listed; `key` names the setting
    in errors. Manifests' image paths resolve against the first manifest's folder unless `image_root` is given."""
    shards = expand(specs, endpoint)
    if not shards:
        raise ConfigError(f"matches no shard ({', '.join(specs)})", f"{key}.storage")
    fmt = fmt or infer_format(shards[0])
    if fmt not in FORMATS:
        raise ConfigError(f"cannot tell the shard format from '{shards[0]}'; set it to one of {', '.join(FORMATS)}",
                          f"{key}.format")
    default_text, default_image = DEFAULT_KEYS[fmt]
    if image_root is None and fmt in ("jsonl", "csv"):  # manifests: image paths relative to the manifest
        image_root = shards[0].rsplit("/", 1)[0] if is_uri(shards[0]) else str(Path(shards[0]).parent)
    return ShardSet(name, fmt, tuple(shards), str(text_key or default_text), image_key or default_image, image_root,
                    int(parts_per_epoch or 1), endpoint, num_samples)

"""What the driver checks about the images before Ray starts.

A wrong `images.storage` used to cost a cluster start-up and minutes of workers skipping every image
("epoch 0 had no batches"). Here, in seconds on the driver: every image folder a run reads from exists,
and a seeded sample of each split's images opens. A sample with some bad files only warns (training
skips and counts them); a sample none of whose images opens stops the run, naming the folder.
`run.data.check_images: false` turns this off where the driver cannot see the workers' image mount.
Shard datasets: every named shard must exist (a listing per folder), a missing one stops the run naming it.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterable

from qformer.core.errors import ConfigError
from qformer.core.errors import ImageDecodeError
from qformer.data.builders import build_builder
from qformer.data.images import load_rgb
from qformer.data.shard_check import check_present

log = logging.getLogger("qformer.data")
SAMPLE_SIZE = 8  # images opened per dataset and split: enough to tell a wrong folder from a few bad files


def image_error(path: str) -> str | None:
    """'path: reason' when the image does not decode to RGB, else None."""
    try:
        load_rgb(path)
    except ImageDecodeError as err:
        return str(err)
    return None


def missing_image_root(builder, paths: Iterable[str]) -> str | None:
    """The builder's image folder when it does not exist and some of `paths` lie under it."""
    root = builder.image_root()
    if "://" in str(root) or root.is_dir():
        return None
    prefix = str(root).rstrip("/") + "/"
    return str(root) if any(p.startswith(prefix) for p in paths) else None


def check_images(cfg, splits: Iterable[str], builders: dict | None = None, sample: int = SAMPLE_SIZE) -> None:
    """Raise ConfigError (key datasets.<name>.build_info.images.storage) when a dataset's image folder
    is missing or none of a sample of a split's images opens. `builders`: name -> builder already
    holding its records (so large annotation files are not read twice); others are built here."""
    wanted = set(splits)
    builders = dict(builders or {})
    local_checks = bool(cfg.run.data.get("check_images", True))
    for name in cfg.datasets:
        builder = builders.get(name) or build_builder(cfg, name)
        if builder.is_sharded():  # named shards must exist (object storage is checked wherever the driver is)
            shards = builder.shard_set()
            if "train" in wanted and (local_checks or "://" in shards.shards[0]):
                check_present(shards)
            continue
        if not local_checks:
            continue
        key = f"datasets.{name}.build_info.images.storage"
        for split in [s for s in builder.splits() if s in wanted or f"{name}/{s}" in wanted]:
            paths = sorted({builder.image_path(r) for r in builder.records(split)})
            missing = missing_image_root(builder, paths)
            if missing:
                raise ConfigError(f"image directory {missing} does not exist (split '{split}' reads "
                                  f"{len(paths)} images from it)", key)
            picked = random.Random(0).sample(paths, min(sample, len(paths)))
            errors = [e for e in map(image_error, picked) if e]
            if errors and len(errors) == len(picked):
                raise ConfigError(f"none of {len(picked)} sampled images of split '{split}' opens "
                                  f"(image folder {builder.image_root()}), e.g. {errors[0]}", key)
            if errors:
                log.warning("%s/%s: %d of %d sampled images do not open (training skips such images), e.g. %s",
                            name, split, len(errors), len(picked), errors[0])

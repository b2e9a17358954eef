"""Training data from a feature cache: rows {"image_embeds", "text_ids", "text_atts"} instead of images.

`dataset(cfg)` mirrors `qformer.data.pipeline.build_train_datasets(cfg)` (same sources, same
ratio handling) so the training loop swaps one for the other when `run.vision_cache` is set.

View choice: view 0 is the eval transform; training reads a train view (1..K-1), or view 0 when the
cache holds only one. With `epoch=None` every pass over the data draws a fresh train view per record
(like online augmentation, where each epoch sees a new crop); a fixed `epoch` (or `view`) gives a
deterministic view for loops that rebuild their dataset each epoch, and for tests.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray.data

from qformer.config.batch_plan import worker_range
from qformer.core.errors import ConfigError
from qformer.data.epoch_rows import epoch_shuffled_dataset
from qformer.data.pipeline import TrainData
from qformer.data.position import ROW, UNIT, UNIT_ROWS
from qformer.features import store
from qformer.features.manifest import check_compatible, read_manifest
from qformer.features.views import train_view_for

MAX_BLOCKS = 1000  # read tasks per epoch at most: few enough to plan cheaply (each costs Ray tens of ms)


class FeatureLoader:
    """Ray Data actor: (shard, row) -> the cached features of one view, read from memory-mapped shards."""

    def __init__(self, cache_dir: str, views: int, view: int | None, seed: int | None):
        self.reader = store.ShardReader(cache_dir)
        self.views, self.view = int(views), view
        self.rng = np.random.default_rng(seed)  # seed None: OS entropy, so each pass differs

    def _pick_views(self, n: int) -> np.ndarray:
        if self.view is not None:
            return np.full(n, self.view, dtype=np.int64)
        if self.views <= 1:
            return np.zeros(n, dtype=np.int64)
        return self.rng.integers(1, self.views, size=n)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        views = self._pick_views(len(batch["row"]))
        feats = self.reader.gather(batch["shard"], batch["row"], views)
        out = {"image_embeds": feats,
               "text_ids": _as_2d(batch["text_ids"], np.int64),
               "text_atts": _as_2d(batch["text_atts"], np.int64)}
        out.update({k: batch[k] for k in (UNIT, ROW, UNIT_ROWS) if k in batch})  # the stream position (no rows drop)
        return out


def _as_2d(column: Any, dtype) -> np.ndarray:
    arr = np.asarray(column)
    if arr.dtype == object:  # list column delivered as an array of arrays
        arr = np.stack([np.asarray(x) for x in arr])
    return arr.astype(dtype)


def open_cache(cfg: Any) -> tuple[Path, dict[str, Any]]:
    """The cache directory named by run.vision_cache and its manifest, after the compatibility check."""
    value = cfg.run.vision_cache
    if not value:
        raise ConfigError("is not set; it must name a directory made by `qformer cache-features`",
                          key="run.vision_cache")
    cache_dir = Path(str(value)).expanduser().resolve()
    if not cache_dir.is_dir():
        raise ConfigError(f"{cache_dir} does not exist; create it with `qformer cache-features --cfg-path F "
                          f"--out {cache_dir}`", key="run.vision_cache")
    manifest = read_manifest(cache_dir)
    check_compatible(manifest, cfg, cache_dir)
    return cache_dir, manifest


def train_sources(cfg: Any) -> list[str]:
    """Datasets with an annotation file for one of run.train_splits (those the writer cached)."""
    splits = [str(s) for s in cfg.run.train_splits]
    return [str(name) for name in cfg.datasets
            if any(s in (cfg.datasets[name].build_info.get("annotations") or {}) for s in splits)]


def source_dataset(cache_dir: str | Path, manifest: dict[str, Any], source: str, *, view: int | None = None,
                   seed: int = 0, batch_size: int = 64, actors: int | tuple[int, int] = 1, plan=None,
                   stream: str = "CachedRows", task_base: int = 0):
    """One source's records as a Ray Dataset of cached features -> (dataset, number of records).

    Shuffling as the image pipeline does it: every epoch a new full permutation of the records
    (qformer.data.epoch_rows), seeded by `seed`, read in blocks of at least `batch_size` rows.
    """
    if view is not None and not 0 <= view < manifest["views"]:
        raise ValueError(f"view {view} out of range: the cache holds {manifest['views']} views")
    table = store.read_records(cache_dir, source)
    rows_per_block = max(int(batch_size), -(-table.num_rows // MAX_BLOCKS))
    ds = epoch_shuffled_dataset(table, rows_per_block, int(seed), name="CachedRows", plan=plan, task_base=task_base,
                                stream=stream)
    ds = ds.map_batches(FeatureLoader, fn_constructor_args=(str(cache_dir), manifest["views"], view, None),
                        batch_size=batch_size, compute=_pool(actors),
                        batch_format="numpy")
    return ds, table.num_rows


def _pool(actors: int | tuple[int, int]):
    if isinstance(actors, int):
        return ray.data.ActorPoolStrategy(size=actors)
    return ray.data.ActorPoolStrategy(min_size=int(actors[0]), max_size=int(actors[1]))


def loader_actors(cfg: Any) -> int | tuple[int, int]:
    """run.data.concurrency when set, else an autoscaling pool of 1..num_workers loader actors."""
    value = cfg.run.data.concurrency
    if value is None:
        return (1, max(1, worker_range(cfg.run.ray.num_workers)[1]))
    return int(value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def dataset(cfg: Any, epoch: int | None = None, view: int | None = None, plan=None):
    """`TrainData`-shaped result (datasets by name + ratios) streaming cached features.

    Refuses a cache whose manifest differs from cfg (ConfigError naming run.vision_cache and the keys).
    """
    cache_dir, manifest = open_cache(cfg)
    sources = train_sources(cfg)
    missing = [s for s in sources if s not in manifest["sources"]]
    if missing:
        raise ConfigError(f"the feature cache at {cache_dir} has no records for datasets {missing} "
                          f"(it holds {sorted(manifest['sources'])}); rebuild it", key="run.vision_cache")
    if view is None and epoch is not None:
        view = train_view_for(epoch, manifest["views"], int(cfg.run.seed))
    batch_size, seed, actors = int(cfg.run.data.batch_size), int(cfg.run.seed), loader_actors(cfg)
    ratios = cfg.run.train_dataset_ratios
    if ratios:
        built = {s: source_dataset(cache_dir, manifest, s, view=view, seed=seed, batch_size=batch_size,
                                    actors=actors, plan=plan, stream=s)
                 for s in sources}
        return TrainData({s: ds for s, (ds, _) in built.items()}, {str(k): float(v) for k, v in ratios.items()},
                         {s: n for s, (_, n) in built.items()})
    # One dataset over all sources, shuffled together (as the image pipeline's "train").
    # one stream "train": the sources share its pass, and their read tasks are numbered apart
    built = [source_dataset(cache_dir, manifest, s, view=view, seed=seed, batch_size=batch_size, actors=actors,
                            plan=plan, stream="train", task_base=i << 20) for i, s in enumerate(sources)]
    first, *rest = [ds for ds, _ in built]
    return TrainData({"train": first.union(*rest) if rest else first}, None, {"train": sum(n for _, n in built)})

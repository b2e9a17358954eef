"""Frozen-ViT feature cache: run the ViT once per image and view, train from the stored features.

    qformer cache-features --cfg-path F --out DIR --views K     # writes DIR (see store.py for the layout)
    run.vision_cache: DIR                                        # training reads features, not images

Entry points (imported lazily: this package is imported by light CLI code):
    cache_features(cfg, out_dir, views)  -> manifest     (writer.py, needs a Ray cluster)
    dataset(cfg, epoch=None, view=None)  -> TrainData     (reader.py)
    open_cache(cfg) -> (dir, manifest)                     raises ConfigError on a mismatching cache
    check_model(model, cfg)                                raises ConfigError if the model's ViT differs
"""
from __future__ import annotations

from typing import Any


def cache_features(*args: Any, **kwargs: Any):
    from qformer.features.writer import cache_features as impl

    return impl(*args, **kwargs)


def dataset(*args: Any, **kwargs: Any):
    from qformer.features.reader import dataset as impl

    return impl(*args, **kwargs)


def open_cache(cfg: Any):
    from qformer.features.reader import open_cache as impl

    return impl(cfg)


def check_model(model: Any, cfg: Any) -> None:
    from qformer.features.guard import check_model as impl

    impl(model, cfg)


__all__ = ["cache_features", "check_model", "dataset", "open_cache"]

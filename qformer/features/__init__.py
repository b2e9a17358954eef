"""Frozen-ViT feature cache: run the ViT once per image and view, train from the stored features.

    qformer cache-features --cfg-path F --out DIR --views K     # writes DIR (see store.py for the layout)
    run.vision_cache: DIR                                        # training reads features, not images

Written by qformer.jobs.cache_features. Entry points (imported lazily: importing any submodule, e.g. `store` or
`flops`, runs this file, and their modules pull in Ray Data, torch and the model):
    dataset(cfg, epoch=None, view=None)  -> TrainData     (reader.py)
    open_cache(cfg) -> (dir, manifest)                     raises ConfigError on a mismatching cache
    check_model(model, cfg)                                raises ConfigError if the model's ViT differs
"""
from __future__ import annotations

from typing import Any


def dataset(*args: Any, **kwargs: Any):
    from qformer.features.reader import dataset as impl  # lazy: see the package docstring

    return impl(*args, **kwargs)


def open_cache(cfg: Any):
    from qformer.features.reader import open_cache as impl  # lazy: see the package docstring

    return impl(cfg)


def check_model(model: Any, cfg: Any) -> None:
    from qformer.features.guard import check_model as impl  # lazy: see the package docstring

    impl(model, cfg)


__all__ = ["check_model", "dataset", "open_cache"]

"""`cache_features(cfg, out_dir, views)`: the whole cache for a config's training data.

Reads each training source's (image, caption) samples through the data builders, runs the Ray
job (job.py) over the unique images, stores each source's records (token ids + where the image's
features live) and writes the manifest last, so a directory with a manifest is a complete cache.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qformer.features import store
from qformer.features.job import CacheJobResult, Encoder, run_cache_job
from qformer.features.manifest import build_manifest, write_manifest
from qformer.features.views import ViewMaker

log = logging.getLogger("qformer.features")


def _samples(cfg: Any) -> dict[str, list[tuple[str, str]]]:
    from qformer.data.builders import build_builder

    out: dict[str, list[tuple[str, str]]] = {}
    for name in cfg.datasets:
        builder = build_builder(cfg, str(name))
        pairs = [pair for split in cfg.run.train_splits if split in builder.splits()
                 for pair in builder.train_samples(split)]
        if pairs:  # as qformer.data.pipeline: sources without train samples take no part
            out[str(name)] = pairs
    return out


def _view_makers(cfg: Any, sources: list[str], views: int, seed: int) -> dict[str, ViewMaker]:
    from qformer.data.builders import build_builder

    makers = {}
    for name in sources:
        builder = build_builder(cfg, str(name))
        train = builder.processor("vis_processor", "train") if views > 1 else None
        makers[str(name)] = ViewMaker(builder.processor("vis_processor", "eval"), train, views, seed)
    return makers


def cache_features(cfg: Any, out_dir: str | Path, views: int = 1, *, batch_size: int = 32,
                   actors: int | None = None, use_gpu: bool | None = None, overwrite: bool = False,
                   make_encoder: Callable[[], Encoder] | None = None) -> dict[str, Any]:
    """Build the cache; returns the manifest. Needs a connected Ray cluster."""
    from qformer.config.errors import ConfigError
    from qformer.data.builders import build_builder
    from qformer.data.tokenizer import tokenize
    from qformer.features.encoder import EncoderFactory

    out = Path(out_dir).expanduser().resolve()
    if (out / store.MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a feature cache; pass overwrite=True (--overwrite) to replace it")
    if out.exists() and overwrite:
        shutil.rmtree(out)
    if views < 1:
        raise ConfigError(f"--views must be >= 1, got {views}", key="views")
    seed = int(cfg.run.seed)
    samples = _samples(cfg)
    if not any(samples.values()):
        raise ConfigError("no training samples in any dataset's train splits", key="run.train_splits")
    images = [(source, path) for source, pairs in samples.items() for path, _ in pairs]
    result: CacheJobResult = run_cache_job(images, out, _view_makers(cfg, list(samples), views, seed),
                                           make_encoder or EncoderFactory(cfg), batch_size=batch_size,
                                           actors=actors, use_gpu=use_gpu)
    keys = sorted(result.index)
    store.write_images_index(out, keys, [result.index[k][0] for k in keys], [result.index[k][1] for k in keys])
    counts: dict[str, int] = {}
    for source, pairs in samples.items():
        text_proc = build_builder(cfg, source).processor("text_processor", "train")
        kept = [(p, c) for p, c in pairs if p in result.index]  # skipped images lose their records, as online
        ids, atts = tokenize(str(cfg.model.bert_model), [text_proc(c) for _, c in kept], int(cfg.model.max_txt_len))
        store.write_records(out, source, [result.index[p][0] for p, _ in kept],
                            [result.index[p][1] for p, _ in kept], ids, atts)
        counts[source] = len(kept)
    manifest = build_manifest(cfg, views, seed, counts, len(result.index), result.feature_shape, result.skipped)
    manifest["vit_fingerprint"] = result.vit_fingerprint
    write_manifest(out, manifest)
    if result.skipped:
        log.warning("feature cache: %d undecodable images skipped (listed in %s)", len(result.skipped),
                    out / store.MANIFEST)
    return manifest

"""Run the frozen ViT once per training image and view, and write a feature cache directory.

View 0 is the eval transform; views 1..K-1 are train-transform augmentations with per-view seeds.
Train from it with `--options run.vision_cache=DIR`: the cache's manifest must match the config's
ViT, image size, processors and tokenizer, or training refuses it. Runs on the Ray cluster named
by run.ray.address / RAY_ADDRESS (GPU actors when it has GPUs), else on a local Ray.
"""
from __future__ import annotations

import argparse
import os

from qformer.core.logs import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg-path", required=True, help="experiment YAML (the training config)")
    parser.add_argument("--out", required=True, help="cache directory to create")
    parser.add_argument("--views", type=int, default=1, help="views per image: 1 eval view + K-1 train views")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=32, help="images per ViT actor call")
    parser.add_argument("--actors", type=int, default=None, help="ViT actors (default: one per GPU, else 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")


def run(args: argparse.Namespace) -> int:
    # lazy: `qformer --help` imports every command module (see qformer/cli.py)
    import ray

    from qformer.config import load_config
    from qformer.jobs.cache_features import cache_features

    setup_logging()
    cfg = load_config(args.cfg_path, args.options)
    started = False
    if not ray.is_initialized():
        address = cfg.run.ray.address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address or None, include_dashboard=False)
        started = True
    try:
        manifest = cache_features(cfg, args.out, args.views, batch_size=args.batch_size, actors=args.actors,
                                  overwrite=args.overwrite)
    finally:
        if started:
            ray.shutdown()
    n, d = manifest["feature_shape"]
    print(f"cached {manifest['n_images']} images x {manifest['views']} views ({n}x{d} fp16) for "
          f"{sum(manifest['sources'].values())} records in {args.out}; "
          f"{len(manifest['skipped_images'])} undecodable images skipped")
    return 0

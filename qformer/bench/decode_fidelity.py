"""What the reduced decode (run.data.train_decode: reduced) changes against LAVIS's exact pixels.

- Pixels: the same images through both decodes with the same augmentation draws (so the same crop
  boxes, flips and RandAugment ops): the mean absolute difference in grey levels (0-255), the worst
  image's, and the share of images that were decoded at a draft scale.
- Loss: the tiny model trained a few steps from the same initial weights on the same batches, once
  on each decode's pixels (dropout and ITM negative sampling seeded alike per step): the mean loss of
  the last half of the steps for each, and their difference.
"""
from __future__ import annotations

import numpy as np

from qformer.data.transform import exact_transform


def pixel_difference(spec, rows: list[tuple[str, str, int]], n: int = 200, seed: int = 0) -> dict:
    """Mean absolute pixel difference, reduced vs exact decode, over the first `n` of `rows` (path, caption, source)."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.data.images import open_encoded
    from qformer.data.processors.image import reduction_factor

    exact_spec = exact_transform(spec)
    diffs, drafted = [], 0
    for i, (path, _, source) in enumerate(rows[:n]):
        reduced, exact = spec.vis_processors[source], exact_spec.vis_processors[source]
        a = exact.process(open_encoded(path), np.random.default_rng([seed, i]))
        b = reduced.process(open_encoded(path), np.random.default_rng([seed, i]))
        diffs.append(float(np.abs(a.astype(np.int16) - b).mean()))
        drafted += _drafted(open_encoded(path).size, reduced, np.random.default_rng([seed, i]), reduction_factor)
    return {"images": len(diffs), "mean_abs_diff": float(np.mean(diffs)), "max_image_mean_abs_diff": float(np.max(diffs)),
            "share_drafted": drafted / max(1, len(diffs)), "reduced_decode": [p.reduced_decode for p in spec.vis_processors]}


def _drafted(size: tuple[int, int], proc, rng: np.random.Generator, reduction_factor) -> bool:
    """Whether the reduced decode of an image of `size` drew a crop that allowed a draft scale."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.data.processors.image import random_resized_crop_box

    if not hasattr(proc, "scale"):  # an eval processor: the whole image
        return reduction_factor(*size, proc.image_size) > 1
    _, _, h, w = random_resized_crop_box(*size, proc.scale, proc.ratio, rng)
    return reduction_factor(w, h, proc.image_size) > 1


def loss_difference(cfg, spec, rows: list[tuple[str, str, int]], steps: int = 30, batch_size: int = 16,
                    seed: int = 0) -> dict:
    """Train the config's model `steps` steps on each decode's pixels of the same batches; compare the losses."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import copy

    import torch

    from qformer.models import build_model
    from qformer.train.amp import resolve_amp
    from qformer.train.step import train_step
    from qformer.bench.common import train_state

    torch.manual_seed(seed)
    initial = build_model(cfg.model)
    order = np.random.default_rng(seed).permutation(len(rows))
    curves = {}
    for name, side in (("reduced", spec), ("exact", exact_transform(spec))):
        model = copy.deepcopy(initial).train()
        state = train_state(model, cfg.run, resolve_amp(False, None, "cpu"))  # fp32
        losses = []
        for step in range(steps):
            # the permutation, cycled: fewer rows than steps x batch_size (a quick run) must not give empty batches
            picked = [rows[order[(step * batch_size + k) % len(rows)]] for k in range(batch_size)]
            batch = _batch(picked, side, seed=[seed, step])
            torch.manual_seed(seed + step)  # dropout and ITM negatives drawn alike on both sides
            out = train_step(state, batch, epoch=0, iter_in_epoch=step, log=True)
            losses.append(float(out.losses["loss"]))
        curves[name] = losses
    tail = slice(steps // 2, None)
    reduced, exact = float(np.mean(curves["reduced"][tail])), float(np.mean(curves["exact"][tail]))
    return {"steps": steps, "batch_size": batch_size, "loss_curve_reduced": curves["reduced"],
            "loss_curve_exact": curves["exact"], "mean_loss_last_half_reduced": reduced,
            "mean_loss_last_half_exact": exact, "difference": reduced - exact}


def _batch(picked, spec, seed) -> dict:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    from qformer.data.transform import AUG_SEED, train_batch

    columns = {"path": np.array([p for p, _, _ in picked], dtype=object),
               "caption": np.array([c for _, c, _ in picked], dtype=object),
               "source": np.array([s for _, _, s in picked], dtype=np.int64),
               AUG_SEED: np.full(len(picked), int(np.random.default_rng(seed).integers(2**62)), dtype=np.int64)}
    return {k: torch.from_numpy(v) for k, v in train_batch(columns, spec).items()}

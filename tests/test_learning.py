"""Proof of learning: a short training run of the tiny model beats the untrained model on test retrieval.

Setup: `write_synthetic` shapes set (300 train images x 5 captions, 24 test images x 5 captions, 64 px),
the tiny model (timm ViT, 4 blocks, random and frozen; MiniLM Q-Former, 8 queries), run.k_test 8,
20 micro-batches of 16 with the real train step (LAVIS LR schedule: 5 warm-up steps to 3e-4, AdamW),
one process on torch's default threads (the thread count moves the trained numbers by a few points).

Chance level on 24 images / 120 captions is r_mean ~ (1+5+10)/24/3 = 22%.
Measured test r_mean, untrained -> trained, this exact setup (seed = model init + data order):
  seed 0: 16.39 -> 51.25 (+34.9)   seed 1: 25.69 -> 35.42 (+9.7)
  seed 2: 12.50 -> 50.00 (+37.5)   seed 3: 20.42 -> 46.94 (+26.5)
(measured on one thread; seed 0 on 2 threads: 16.39 -> 47.50, ~40 s on 2 cores.) The test runs seed 0 and asks for a
gain of at least MARGIN = 8 points: below every measured gain, so it holds for any of these seeds, and
far above what an untrained-vs-untrained comparison can produce (identical weights give identical r_mean).
"""
from __future__ import annotations

import pytest

from qformer.config import load_config_dict

pytestmark = pytest.mark.slow

SEED = 0
STEPS = 20
MARGIN = 8.0


def test_trained_tiny_model_beats_untrained_on_test_retrieval(tmp_path):
    from qformer.data.synth import coco_caption_section, write_synthetic
    from learning import train_and_compare

    write_synthetic(tmp_path, n_train=300, n_val=2, n_test=24, seed=0, image_size=64)
    run = {"batch_size_train": 16, "batch_size_eval": 32, "k_test": 8, "init_lr": 3e-4, "min_lr": 1e-5,
           "warmup_lr": 1e-6, "warmup_steps": 5, "max_epoch": 1, "amp": False,
           "valid_splits": [], "test_splits": ["test"]}
    cfg = load_config_dict({"model": {"arch": "blip2", "model_type": "tiny"},
                            "datasets": coco_caption_section(tmp_path), "run": run})
    result = train_and_compare(cfg, STEPS, SEED)
    print(f"test r_mean: untrained {result.before['r_mean']:.2f} -> trained {result.after['r_mean']:.2f}")
    assert result.after["r_mean"] >= result.before["r_mean"] + MARGIN
    # both directions improve, not just one
    assert result.after["txt_r_mean"] > result.before["txt_r_mean"]
    assert result.after["img_r_mean"] > result.before["img_r_mean"]

"""Proof of learning: retrieval of a model before and after a short single-process training run.

Used by tests/test_learning.py (and usable from a notebook). It trains with the same per-micro-batch
step as the Ray workers (`qformer.train.step.train_step`: LAVIS LR schedule, AdamW groups, AMP policy)
but feeds it in-process, without Ray Data: on 2 CPU cores starting Ray costs more than the run itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class LearningResult:
    before: dict[str, float]
    after: dict[str, float]
    steps: int
    final_losses: dict[str, float]


def train_batches(cfg: Any, seed: int):
    """Endless training batches {"image" uint8, "text_ids", "text_atts"} from the config's train splits.

    Same processors and tokenisation as the Ray Data pipeline, but every random draw (shuffle and
    augmentation) comes from one generator seeded with `seed`, so a run is reproducible.
    """
    from qformer.data.images import load_rgb
    from qformer.data.pipeline import _train_sources
    from qformer.data.tokenizer import tokenize

    sources = _train_sources(cfg)
    vis = [b.processor("vis_processor", "train") for _, b, _ in sources]
    txt = [b.processor("text_processor", "train") for _, b, _ in sources]
    rows = [(p, c, i) for i, (_, _, samples) in enumerate(sources) for p, c in samples]
    rng = np.random.default_rng(seed)
    bs = int(cfg.run.batch_size_train)
    while True:
        order = rng.permutation(len(rows))
        for lo in range(0, len(order) - bs + 1, bs):  # drop_last, as LAVIS's train loader
            picked = [rows[j] for j in order[lo : lo + bs]]
            images = np.stack([vis[src](load_rgb(path), rng) for path, _, src in picked])
            ids, atts = tokenize(str(cfg.model.bert_model), [txt[src](c) for _, c, src in picked], int(cfg.model.max_txt_len))
            yield {"image": torch.as_tensor(images), "text_ids": torch.as_tensor(ids), "text_atts": torch.as_tensor(atts)}


def train_and_compare(cfg: Any, steps: int, seed: int, split: str = "test", device: str = "cpu") -> LearningResult:
    """Build the model with `seed`, evaluate on `split`, train `steps` micro-batches, evaluate again."""
    from qformer.data.pipeline import build_eval_split
    from qformer.evaluate.retrieval import evaluate_retrieval
    from qformer.models import build_model
    from qformer.core.seeding import setup_seeds
    from qformer.train.amp import amp_for_run
    from qformer.train.lr_schedule import build_lr_scheduler
    from qformer.train.optim import build_optimizer
    from qformer.train.step import TrainState, train_step

    setup_seeds(seed, 0)
    dev = torch.device(device)
    model = build_model(cfg.model).to(dev)
    eval_split = build_eval_split(cfg, split)
    run = cfg.run
    kw = dict(k_test=int(run.k_test), batch_size=int(run.batch_size_eval), device=dev)
    before = evaluate_retrieval(model, eval_split, **kw)

    optimizer = build_optimizer(model, run)
    state = TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=build_lr_scheduler(optimizer, run),
        amp=amp_for_run(run, dev),
        device=dev,
        accum_grad_iters=int(run.accum_grad_iters),
    )
    state.scaler = state.amp.make_scaler()
    model.train()
    per_epoch = int(run.get("max_steps_per_epoch") or steps)
    out = None
    for i, batch in zip(range(steps), train_batches(cfg, seed)):
        out = train_step(state, batch, epoch=i // per_epoch, iter_in_epoch=i % per_epoch)
    after = evaluate_retrieval(model, eval_split, **kw)
    losses = {k: float(v) for k, v in (out.losses if out else {}).items()}
    return LearningResult(before, after, steps, losses)

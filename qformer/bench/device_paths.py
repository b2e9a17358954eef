"""The device check's paths beyond the timed steps: what a first real run on a GPU also goes through.

Each returns a dict with `ok` (and the error where it failed, so one run reports every path): retrieval
evaluation with the ITM re-rank, a checkpoint written on the device and resumed from, and the memory of
one fp16 step at LAVIS's batch of 100 per GPU. Like qformer.bench.device: torch, transformers, timm and
Pillow only. (Accumulation under DDP's no_sync and DDP's settings are in the device check's DDP step.)
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any


def _failed(err: Exception) -> dict[str, Any]:
    return {"ok": False, "error": f"{type(err).__name__}: {err}", "where": traceback.format_exc(limit=-4)}


def eval_rerank(model, device: str, tmp: Path, image_size: int, autocast_dtype) -> dict[str, Any]:
    """Retrieval on 8 random images x 2 captions with the ITM re-rank of the top 4 (k_test), as the training
    loop's validation runs it (qformer.evaluate.retrieval)."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import numpy as np
    from PIL import Image

    from qformer.data.processors import build_processor
    from qformer.evaluate.retrieval import evaluate_retrieval

    try:
        rng = np.random.default_rng(0)
        paths = []
        for i in range(8):
            path = tmp / f"eval_{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))

        class Split:
            image_paths = paths
            texts = [f"a photo number {i} {'left' if j else 'right'}" for i in range(8) for j in range(2)]
            img2txt = [[2 * i, 2 * i + 1] for i in range(8)]
            txt2img = [i // 2 for i in range(16)]
            vis_processor = build_processor({"name": "blip_image_eval", "image_size": image_size})

        start = time.perf_counter()
        metrics = evaluate_retrieval(model, Split(), k_test=4, batch_size=4, device=device,
                                     autocast_dtype=autocast_dtype)
        model.train()
        return {"ok": all(np.isfinite(v) for v in metrics.values()), "seconds": time.perf_counter() - start,
                "r_mean": metrics.get("r_mean")}
    except Exception as err:
        return _failed(err)


def checkpoint_resume(state, batch: dict, tmp: Path) -> dict[str, Any]:
    """Save the step's state (model, optimiser, GradScaler, schedule) from the device, load it back into the same
    objects and train a step on: the scale and the optimiser step count continue."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    from qformer.train import checkpoint as ckpt_io
    from qformer.train.optim import load_optimizer_state
    from qformer.train.step import train_step

    try:
        train_step(state, batch, epoch=0, iter_in_epoch=0)  # optimiser and scaler state worth saving
        saved = ckpt_io.build_state(state.unwrapped, state.optimizer, state.scheduler, state.scaler, {}, epoch=0,
                                    step=state.global_step, iters_in_epoch=state.global_step, epoch_complete=False,
                                    mlflow_run_id=None)
        directory = ckpt_io.save_dir(saved, tmp / "checkpoint")
        loaded = ckpt_io.load_file(directory)
        state.unwrapped.load_checkpoint({"model": loaded["model"]})
        load_optimizer_state(state.optimizer, loaded["optimizer"])
        if state.scaler is not None:
            state.scaler.load_state_dict(loaded["scaler"])
        scale = state.scaler.get_scale() if state.scaler is not None else None
        out = train_step(state, batch, epoch=0, iter_in_epoch=1)
        return {"ok": bool(torch.isfinite(out.losses["loss"])), "bytes": (directory / ckpt_io.CKPT_FILE).stat().st_size,
                "grad_scale_restored": scale}
    except Exception as err:
        return _failed(err)


def batch_memory(model, state, make_batch, batch_size: int = 100) -> dict[str, Any]:
    """Peak memory of one train step at LAVIS's per-GPU batch (100 images, online frozen ViT)."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    from qformer.train.step import train_step

    try:
        batch = make_batch(batch_size)
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = train_step(state, batch, epoch=0, iter_in_epoch=0)
        torch.cuda.synchronize()
        return {"ok": bool(torch.isfinite(out.losses["loss"])), "batch_size": batch_size,
                "seconds": time.perf_counter() - start, "peak_memory_bytes": torch.cuda.max_memory_allocated()}
    except Exception as err:
        return _failed(err)

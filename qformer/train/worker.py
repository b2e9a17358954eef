"""The TorchTrainer entry point of one training worker: set up, then hand over to the TrainingLoop.

Per worker: seed (run.seed + rank), build the model (frozen ViT inside), restore the latest Ray
checkpoint (or a --resume file) into the unwrapped model BEFORE `prepare_model` (DDP), build optimiser,
LR schedule and AMP, restore their state, and start the loop where the checkpoint left off. The batch
plan of this world size (qformer.config.batch_plan) sets micro-batches per step and the LR scale, so an
elastic restart at another size keeps the global batch.
"""
from __future__ import annotations

import logging
from typing import Any

import ray.train
import ray.train.torch
import torch
from omegaconf import OmegaConf

from qformer.config import batch_plan
from qformer.core.logs import get_logger, setup_logging
from qformer.core.seeding import setup_seeds
from qformer.data.stats import LEDGER_KEY, restore_ledger
from qformer.features import check_model
from qformer.models import build_model
from qformer.train import checkpoint as ckpt_io
from qformer.train.amp import amp_for_run
from qformer.train.ddp import ddp_options
from qformer.train.loop import TrainingLoop
from qformer.train.loop_config import LoopConfig
from qformer.train.lr_schedule import build_lr_scheduler
from qformer.train.optim import build_optimizer, load_optimizer_state
from qformer.train.step import TrainState

log = get_logger("train")


def train_loop_per_worker(lc: LoopConfig) -> None:
    """TorchTrainer's `train_loop_per_worker`; `lc` is built by qformer.jobs.train_job."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_logging(rank)
    quiet_report_lines()
    cfg = OmegaConf.create(lc.cfg)
    run = cfg.run
    setup_seeds(int(run.seed), rank)
    if run.ray.get("torch_threads"):  # Ray pins a worker to its CPU share (1 thread); a CPU box may want more
        torch.set_num_threads(int(run.ray.torch_threads))
    device = ray.train.torch.get_device()
    amp = amp_for_run(run, device)

    model = build_model(cfg.model, vit_fp16_on_cpu=amp.vit_fp16_on_cpu)
    saved, source = restore_state(lc.resume_path)
    if saved is not None:
        model.load_checkpoint({"model": saved["model"]})
        log.info("restored model from %s", source)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_options())  # to device; DDP if world > 1
    unwrapped = getattr(model, "module", model)
    if run.get("vision_cache"):  # after prepare_model: DDP has broadcast rank 0's (seeded) ViT
        check_model(unwrapped, cfg)

    optimizer = build_optimizer(unwrapped, run)
    scheduler = build_lr_scheduler(optimizer, run)
    scaler = amp.make_scaler()
    plan = batch_plan.plan_for(run, world, lc.workers)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, amp=amp, device=device, scaler=scaler,
                       accum_grad_iters=plan.accum_grad_iters, skip_nonfinite=bool(run.skip_nonfinite),
                       image_mean=lc.image_mean, image_std=lc.image_std, micro_per_step=plan.micro_per_step)
    start, positions = ckpt_io.ResumePoint(0, 0, 0), None
    if saved is not None:
        load_optimizer_state(optimizer, saved["optimizer"])
        if saved.get("scheduler") is not None:
            scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler") is not None:
            scaler.load_state_dict(saved["scaler"])
        start = ckpt_io.ResumePoint.from_state(saved)
        state.global_step = state._last_checked_step = start.step
        positions = saved.get("data_position") or {}
        if rank == 0:  # the run's lost samples so far: its skipped_images counts on from them
            restore_ledger(positions.get(LEDGER_KEY))
        del saved
    scheduler.lr_scale = plan.lr_scale  # the current world's, whatever the checkpoint's world was
    log.info("rank %d/%d on %s, AMP %s, start at epoch %d iter %d (global step %d); per worker %d x %d micro-batches "
             "per step, accumulation %d, global batch %d, LR x %.3g", rank, world, device, amp.describe(), start.epoch,
             start.iter_in_epoch, start.step, plan.worker_batch, plan.micro_per_step, plan.accum_grad_iters,
             plan.global_batch, plan.lr_scale)
    TrainingLoop(lc, cfg, state, unwrapped, plan, rank, world, positions).run(start)


def quiet_report_lines() -> None:
    """Ray Train logs every `ray.train.report` at INFO as the whole report (metrics dict, checkpoint); the loop
    logs its own lines. On workers the logger is named by the module's file path; in Train local mode it is
    train_fn_utils's."""
    try:
        from ray.train.v2._internal.execution import context, train_fn_utils
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(train_fn_utils.__name__).setLevel(logging.WARNING)


def restore_state(resume_path: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """Ray's latest checkpoint (failure restart / same-name re-launch) wins over an explicit --resume."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            reason = ckpt_io.incomplete(directory)
            if reason is None:
                return ckpt_io.load_file(directory), f"Ray checkpoint {checkpoint.path}"
        if not resume_path:
            raise ValueError(f"the run's latest checkpoint {checkpoint.path} is incomplete ({reason}) and there "
                             "is no earlier one to fall back to")
        # the driver found it incomplete too (qformer.train.resume) and handed the previous good one
        log.warning("Ray checkpoint %s is incomplete (%s); resuming from %s", checkpoint.path, reason, resume_path)
    if resume_path:
        return ckpt_io.load_file(resume_path), str(resume_path)
    return None, None

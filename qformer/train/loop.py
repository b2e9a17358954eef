"""The per-worker training loop run by Ray Train's TorchTrainer (LAVIS RunnerBase/RunnerIter, spec §5).

Per worker: seed (run.seed + rank), build the model (frozen ViT inside), restore the latest Ray
checkpoint (or a --resume file) into the unwrapped model BEFORE `prepare_model` (DDP), then iterate this
worker's shard of the Ray Dataset with drop_last batches. Epoch-based runs (`max_epoch`) end an epoch
when the shard is exhausted (or at run.max_steps_per_epoch); iteration-based runs (`max_iters` +
`iters_per_inner_epoch`) cycle the data and count inner epochs, as LAVIS's runner_iter. With
run.train_dataset_ratios every batch comes from one source drawn by ratio with an RNG seeded from
(seed, epoch, step), so all ranks draw the same source.

Checkpoints go through `ray.train.report` (a barrier: every rank calls it the same number of times;
rank 0 passes the directory, others None) every run.save_freq_steps steps and at every epoch end.
MLflow logging is rank 0 only, into the run id the launcher created.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import OmegaConf

from qformer.data.position import PositionTracker, StreamPosition
from qformer.logging_setup import get_logger, setup_logging
from qformer.seeding import setup_seeds
from qformer.train import checkpoint as ckpt_io
from qformer.train import elastic, preemption
from qformer.train.amp import resolve_amp
from qformer.train.lr_schedule import build_lr_scheduler, schedule_max_epoch
from qformer.train.meters import LossMeter, memory_metrics
from qformer.train.optim import build_optimizer
from qformer.train.step import TrainState, check_finite, train_step

log = get_logger("train")


class InjectedFailure(RuntimeError):
    """Raised once by the fault-injection hook (QFORMER_FAIL_ONCE_AT_STEP) to exercise recovery."""


def train_loop_per_worker(config: dict) -> None:
    """TorchTrainer entry point; `config` is built by qformer.train.launcher.loop_config()."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_logging(rank)
    cfg = OmegaConf.create(config["cfg"])
    run = cfg.run
    setup_seeds(int(run.seed), rank)
    if run.ray.get("torch_threads"):  # Ray pins a worker to its CPU share (1 thread); a CPU box may want more
        torch.set_num_threads(int(run.ray.torch_threads))
    device = ray.train.torch.get_device()

    from qformer.models import build_model

    model = build_model(cfg.model)
    state_dict, source = _restore_state(config)
    if state_dict is not None:
        model.load_checkpoint({"model": state_dict["model"]})
        log.info("restored model from %s", source)
    model = ray.train.torch.prepare_model(model)  # moves to device; DDP only when world > 1
    unwrapped = getattr(model, "module", model)
    if run.get("vision_cache"):  # after prepare_model: DDP has broadcast rank 0's (seeded) ViT
        from qformer.features import check_model

        check_model(unwrapped, cfg)

    optimizer = build_optimizer(unwrapped, run)
    scheduler = build_lr_scheduler(optimizer, run)
    amp = resolve_amp(bool(run.amp), str(run.amp_dtype), device)
    scaler = amp.make_scaler()
    workers = config.get("workers")  # the launcher's (min, max); Train local mode: (1, 1)
    plan = elastic.plan_for(run, world, tuple(workers) if workers else None)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, amp=amp, device=device, scaler=scaler,
                       accum_grad_iters=plan.accum_grad_iters, skip_nonfinite=bool(run.skip_nonfinite),
                       image_mean=_tuple(config.get("mean")), image_std=_tuple(config.get("std")),
                       micro_per_step=plan.micro_per_step)
    start = ckpt_io.ResumePoint(0, 0, 0)
    if state_dict is not None:
        optimizer.load_state_dict(state_dict["optimizer"])
        if state_dict.get("scheduler") is not None:
            scheduler.load_state_dict(state_dict["scheduler"])
        if scaler is not None and state_dict.get("scaler") is not None:
            scaler.load_state_dict(state_dict["scaler"])
        start = ckpt_io.ResumePoint.from_state(state_dict)
        state.global_step = state._last_checked_step = start.step
        config = {**config, "data_position": state_dict.get("data_position") or {}}
        del state_dict
    scheduler.lr_scale = plan.lr_scale  # the current world's, whatever the checkpoint's world was
    log.info("rank %d/%d on %s, AMP %s, start at epoch %d iter %d (global step %d); per worker %d x %d micro-batches "
             "per step, accumulation %d, global batch %d, LR x %.3g", rank, world, device, amp.describe(), start.epoch,
             start.iter_in_epoch, start.step, plan.worker_batch, plan.micro_per_step, plan.accum_grad_iters,
             plan.global_batch, plan.lr_scale)

    runner = _Runner(config, cfg, state, rank, world, unwrapped, plan)
    runner.run(start)


def _tuple(value: Any) -> tuple[float, ...] | None:
    return tuple(float(v) for v in value) if value is not None else None


def _restore_state(config: dict) -> tuple[dict | None, str | None]:
    """Ray's latest checkpoint (failure restart / same-name re-launch) wins over an explicit --resume."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            reason = ckpt_io.incomplete(directory)
            if reason is None:
                return ckpt_io.load_file(directory), f"Ray checkpoint {checkpoint.path}"
        if not config.get("resume_path"):
            raise ValueError(f"the run's latest checkpoint {checkpoint.path} is incomplete ({reason}) and there "
                             "is no earlier one to fall back to")
        # the driver found it incomplete too (qformer.train.resume) and handed the previous good one
        log.warning("Ray checkpoint %s is incomplete (%s); resuming from %s", checkpoint.path, reason,
                    config["resume_path"])
    if config.get("resume_path"):
        return ckpt_io.load_file(config["resume_path"]), str(config["resume_path"])
    return None, None


class _Runner:
    """The epoch / step bookkeeping of one worker."""

    def __init__(self, config: dict, cfg: Any, state: TrainState, rank: int, world: int, unwrapped: torch.nn.Module,
                 plan: elastic.BatchPlan | None = None):
        import ray.train

        self.config, self.cfg, self.run_cfg, self.state = config, cfg, cfg.run, state
        self.rank, self.world, self.unwrapped = rank, world, unwrapped
        run = cfg.run
        self.iter_based = bool(run.get("max_iters"))
        self.max_epoch = schedule_max_epoch(run)
        self.plan = plan or elastic.BatchPlan(world, int(run.batch_size_train), 1, int(run.accum_grad_iters), 1.0)
        self.batch_size = self.plan.worker_batch  # rows per micro-batch on this worker
        self.log_freq = max(1, int(run.log_freq))
        self.save_freq_steps = int(run.save_freq_steps or 0)
        self.ratios: dict[str, float] | None = config.get("ratios")
        self.names = list(self.ratios) if self.ratios else ["train"]
        self.shards = {name: ray.train.get_dataset_shard(name) for name in self.names}
        self.tracker = None
        mlflow_cfg = config.get("mlflow")
        if rank == 0 and mlflow_cfg:
            from qformer.tracking import RunTracker

            from qformer.tracking import fail_fast_http

            fail_fast_http()
            self.tracker = RunTracker(mlflow_cfg["uri"], mlflow_cfg["run_id"])
        self.logged_through = 0  # steps up to this one are in MLflow already (a restart re-runs them)
        self.run_id = mlflow_cfg["run_id"] if mlflow_cfg else None
        self.window = LossMeter()
        self.window_start = time.perf_counter()
        self.window_wait = 0.0
        self.window_steps = 0
        self.last_metrics: dict[str, float] = {}
        self.fail_at = config.get("fail_once_at_step")
        self.fail_marker = config.get("fail_marker")
        self.debug_dir = config.get("debug_dir")
        self.tested = False  # test splits evaluated (at the last epoch end, or in finish())
        self.seen_batches: list[str] = []
        self._streams: dict[str, Iterator[dict]] = {}
        # qformer.data.position: tells the Ray Data sources which pass to read, and what of it is done
        self.stream_plan = config.get("stream_plan")
        saved = config.get("data_position") or {}
        self.positions = {n: PositionTracker(StreamPosition.from_dict(saved.get(n))) for n in self.names}
        self.position_restored = bool(saved)
        # preemption notice: every rank votes at the same steps, also where the handler could not be installed
        self.stop_vote = None
        if run.elastic.preemption_checkpoint:
            preemption.install()
            self.stop_vote = preemption.StopVote()
        self.stopping = False

    # ---- epochs --------------------------------------------------------------------------------
    def epoch_length(self) -> int | None:
        """Micro-batches per (inner) epoch when known up front; None = until the shard is exhausted."""
        cap = self.run_cfg.get("max_steps_per_epoch")
        if self.iter_based:
            n = int(self.run_cfg.iters_per_inner_epoch)
        elif self.ratios:  # sources cycle, so an epoch is one pass over all rows in batches
            rows = sum(int(self.config.get("num_rows", {}).get(n, 0)) for n in self.names)
            n = max(1, rows // self.plan.samples_per_step)
        else:
            n = None
        if cap:
            n = int(cap) if n is None else min(n, int(cap))
        return n

    def run(self, start: ckpt_io.ResumePoint) -> None:
        if self.debug_dir and self.rank == 0:
            self._record_start(start)
        if self.tracker is not None:  # after a restart the steps since the checkpoint (all of them, when the
            try:                      # failure came before Ray registered one) are re-run, but logged once
                self.logged_through = max((s for s, _ in self.tracker.metric_history("loss")), default=0)
            except Exception as err:  # noqa: BLE001 - informational: at worst a step is logged twice
                log.warning("MLflow: could not read the loss history (%s)", err)
        first_epoch = start.epoch
        if self.iter_based:  # runner_iter: the inner epoch follows from the global step
            first_epoch = start.step // int(self.run_cfg.iters_per_inner_epoch)
        for epoch in range(first_epoch, self.max_epoch):
            begin = start.iter_in_epoch if epoch == start.epoch else 0
            if self.iter_based:
                begin = start.step - epoch * int(self.run_cfg.iters_per_inner_epoch) if epoch == first_epoch else 0
            self.train_epoch(epoch, begin)
        self.finish()

    def _batches(self, epoch: int, begin: int) -> Iterator[dict]:
        cycling = self.iter_based or bool(self.ratios)
        if cycling:
            # runner_iter: one endless stream per source across inner epochs (LAVIS's IterLoader), not a
            # fresh pass per inner epoch; closed in finish().
            if not self._streams:
                self._streams = {n: self._source(n, self.positions[n].position.pass_ if self.position_restored
                                                 else epoch, True) for n in self.names}
            yield from self._draw(self._streams, epoch, begin)
            return
        iters = {n: self._source(n, epoch, False) for n in self.names}
        if begin and not self.position_restored:  # a checkpoint from before data positions: skip by count
            log.info("resuming inside epoch %d: skipping %d batches of this epoch's data", epoch, begin)
            for _ in range(begin):
                if next(iters["train"], None) is None:
                    return
        try:
            yield from self._draw(iters, epoch, begin)
        finally:  # close Ray's iterators now (an early stop at max_steps_per_epoch leaves them open)
            for it in iters.values():
                it.close()

    def _draw(self, iters: dict[str, Iterator[dict]], epoch: int, begin: int) -> Iterator[dict]:
        i = begin
        while True:
            name = pick_stream(self.ratios, int(self.run_cfg.seed), epoch, i) if self.ratios else self.names[0]
            batch = next(iters[name], None)
            if batch is None:
                return
            self.positions[name].observe(batch)
            yield batch
            i += 1

    def _source(self, name: str, first_pass: int, cycle: bool) -> Iterator[dict]:
        """Batches of stream `name`, from pass `first_pass` on (every pass when cycling). Each pass starts by
        telling the stream's source, through the plan, which pass to read and what of it is done."""
        shard, data = self.shards[name], self.run_cfg.data
        buffer = int(data.shuffle_buffer or 0)
        round_ = 0
        while True:
            pass_ = first_pass + round_
            tracker = self.positions[name]
            tracker.start_pass(pass_)  # a new pass forgets the old one's progress
            if self.stream_plan is not None:  # every rank writes the same; Ray plans the read after all have
                import ray

                ray.get(self.stream_plan.set.remote(name, tracker.position.to_dict()))
            seen = False
            for batch in shard.iter_torch_batches(
                batch_size=self.batch_size, drop_last=True, prefetch_batches=int(data.prefetch_batches),
                local_shuffle_buffer_size=buffer or None,
                local_shuffle_seed=(int(self.run_cfg.seed) * 1000 + pass_ * 31) if buffer else None,
                pin_memory=torch.cuda.is_available(),  # makes the host->GPU copy asynchronous
            ):
                seen = True
                yield batch
            if not cycle:
                return
            if not seen:
                raise RuntimeError(f"training dataset '{name}' yields no full batch of {self.batch_size} on rank "
                                   f"{self.rank}; lower run.batch_size_train or add data")
            round_ += 1

    def train_epoch(self, epoch: int, begin: int) -> None:
        from qformer.progress import Progress

        self.state.model.train()
        length = self.epoch_length()
        total = length
        if total is None and self.config.get("num_rows"):
            total = int(self.config["num_rows"].get("train") or 0) // self.plan.samples_per_step or None
        # a bar on a terminal; in a job log log_step's lines are the progress (log_every_s=None)
        bar = Progress(total, f"epoch {epoch}", "steps", initial=begin, enabled=self.rank == 0, log_every_s=None)
        epoch_meter = LossMeter()
        i = begin
        micro = self.plan.micro_per_step
        # `begin` counts steps, micro_per_step micro-batches each. The data position (qformer.data.position)
        # already leaves out what was trained on; only a checkpoint from before positions skips by count
        batches = self._batches(epoch, begin * micro)
        steps = _grouped(batches, micro)
        self.window_start, self.window_wait, self.window_steps = time.perf_counter(), 0.0, 0
        while length is None or i < length:
            t0 = time.perf_counter()
            group = next(steps, None)
            self.window_wait += time.perf_counter() - t0
            if group is None:
                break
            log_now = (self.state.global_step + 1) % self.log_freq == 0
            for j, batch in enumerate(group):
                if self.debug_dir:
                    self.seen_batches.append(_fingerprint(batch))
                    _append_rows(Path(self.debug_dir) / f"rows-rank{self.rank}.jsonl", self.state.global_step + 1, batch)
                out = train_step(self.state, batch, epoch, i, log=log_now and j == micro - 1, micro=j)
                self.window.update(out.losses)
                epoch_meter.update(out.losses)
            self.window_steps += 1
            i += 1
            bar.update(1)
            if log_now:
                self.log_step(epoch, i, length, out, bar)
            at_epoch_end = length is not None and i >= length
            saved = False
            if self.save_freq_steps and self.state.global_step % self.save_freq_steps == 0 and not at_epoch_end:
                self.save(epoch, i, epoch_complete=False, metrics=self.last_metrics)
                saved = True
            if self._stop_agreed(i):
                if at_epoch_end:  # the epoch-end checkpoint below is the one
                    break
                if not saved:
                    self.save(epoch, i, epoch_complete=False, metrics=self.last_metrics)
                self._stop(epoch, i)
            self._maybe_inject_failure()
        bar.close()
        batches.close()
        if i == begin == 0:  # (a resume at the very end of an epoch whose length was unknown has nothing left)
            raise RuntimeError(f"epoch {epoch} had no batches on rank {self.rank}: the training shard is empty or "
                               f"smaller than one batch of {self.batch_size}")
        self.end_epoch(epoch, i, epoch_meter)
        if self.stopping and epoch < self.max_epoch - 1:  # after the last epoch there is nothing to restart for
            self._stop(epoch + 1, 0)

    def _stop_agreed(self, i: int) -> bool:
        """The preemption vote, at optimiser-step boundaries only (a checkpoint mid-accumulation would lose
        the accumulated gradients)."""
        if self.stop_vote is None or i % max(1, int(self.run_cfg.accum_grad_iters)):
            return False
        self.stopping = self.stopping or self.stop_vote.agreed()
        return self.stopping

    def _stop(self, epoch: int, i: int) -> None:
        """After the preemption checkpoint: raise on every rank once Ray Train has registered it. The rank-0
        report (the one with the checkpoint) is slower than the others; raising as soon as ours is queued
        lets the controller restart on the first error, from the checkpoint before. A second report returns
        only when the first was consumed (Ray's result queue holds one), and the barrier holds the other
        ranks until rank 0 is there."""
        import ray.train

        if self.rank == 0 and self.tracker is not None:  # the MLflow UI shows where each notice checkpointed
            _safe(self.tracker.log_metrics_buffered, {"preemption_checkpoint": 1.0}, step=self.state.global_step)
        ray.train.report({"step": self.state.global_step, "preempted": 1.0})
        if self.stop_vote is not None and self.stop_vote.group is not None:
            torch.distributed.barrier(group=self.stop_vote.group)
        raise preemption.PreemptedError(
            f"preempted (SIGTERM): every rank saved a checkpoint at global step {self.state.global_step} (epoch "
            f"{epoch} iter {i}); Ray Train restarts the worker group from it (run.ray.max_failures)")

    # ---- logging -------------------------------------------------------------------------------
    def log_step(self, epoch: int, i: int, length: int | None, out: Any, bar: Any) -> None:
        check_finite(self.state)  # collective in error mode; also keeps the next checkpoint a good one
        losses = self.window.mean()
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        metrics = dict(losses)
        metrics.update({
            "lr": out.lr,
            "temp": float(self.unwrapped.temp.detach()) if hasattr(self.unwrapped, "temp") else None,
            "samples_per_s": self.window_steps * self.plan.samples_per_step / elapsed,
            "data_wait_frac": min(1.0, self.window_wait / elapsed),
            "grad_norm": out.grad_norm,
            "epoch": float(epoch),
            "skipped_nonfinite": float(self.state.skipped_nonfinite),
            # elastic training: the MLflow UI shows every resize and what it kept
            "world_size": float(self.world),
            "global_batch": float(self.plan.global_batch),
            "accum_grad_iters": float(self.plan.accum_grad_iters),
            "worker_batch": float(self.plan.worker_batch),
        })
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if self.rank == 0:
            metrics["skipped_images"] = float(_skipped_images())
            metrics.update(memory_metrics(self.state.device))
            if self.tracker is not None and self.state.global_step > self.logged_through:
                self.tracker.log_metrics_buffered(metrics, step=self.state.global_step)  # an outage buffers
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}", lr=f"{out.lr:.2e}", refresh=False)
            of = f"/{length}" if length else ""
            log.info("epoch %d iter %d%s step %d | loss %.4f (itc %.4f itm %.4f lm %.4f) | lr %.3e | %.1f samples/s | "
                     "data wait %.0f%%", epoch, i, of, self.state.global_step, metrics.get("loss", math.nan),
                     metrics.get("loss_itc", math.nan), metrics.get("loss_itm", math.nan),
                     metrics.get("loss_lm", math.nan), out.lr, metrics["samples_per_s"], 100 * metrics["data_wait_frac"])
        self.last_metrics = {k: metrics[k] for k in ("loss", "lr") if k in metrics}
        self.window_start, self.window_wait, self.window_steps = time.perf_counter(), 0.0, 0

    def end_epoch(self, epoch: int, iters: int, epoch_meter: LossMeter) -> None:
        check_finite(self.state)
        epoch_losses = epoch_meter.mean()  # LAVIS: epoch global averages, all-reduced
        metrics: dict[str, float] = {f"train_epoch/{k}": v for k, v in epoch_losses.items()}
        run = self.run_cfg
        if list(run.valid_splits) and epoch % max(1, int(run.val_freq)) == 0:
            for split in run.valid_splits:
                metrics.update({f"{split}/{k}": v for k, v in self.evaluate(split).items()})
        if epoch == self.max_epoch - 1:  # test metrics ride on the final checkpoint's report (Ray keeps
            metrics.update(self.test_metrics())  # only metrics reported together with a checkpoint)
        if self.rank == 0 and self.tracker is not None:
            self.tracker.log_metrics_buffered(metrics, step=epoch)  # per-epoch metrics: the epoch is the step
            _safe(self.tracker.log_loss_curve)
        if self.rank == 0:
            log.info("epoch %d done: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        self.save(epoch, iters, epoch_complete=True, metrics=metrics)

    def evaluate(self, split: str) -> dict[str, float]:
        from qformer.data.pipeline import build_eval_split
        from qformer.evaluate.retrieval import evaluate_retrieval_scores
        from qformer.evaluate.visuals import log_eval_visuals

        data = build_eval_split(self.cfg, split)
        result, scores = evaluate_retrieval_scores(
            self.unwrapped, data, k_test=int(self.run_cfg.k_test), batch_size=int(self.run_cfg.batch_size_eval),
            device=self.state.device, rank=self.rank, world_size=self.world, autocast_dtype=self.state.amp.dtype,
            label=f"eval {split}")
        if self.rank == 0 and self.tracker is not None:  # gallery + attention maps, rank 0 only (no collective)
            log_eval_visuals(self.tracker, self.unwrapped, data, scores, split, f"step_{self.state.global_step:08d}",
                             self.state.device, self.state.amp.dtype)
        self.state.model.train()
        return {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}

    def test_metrics(self) -> dict[str, float]:
        self.tested = True
        return {f"{split}/{k}": v for split in self.run_cfg.test_splits for k, v in self.evaluate(split).items()}

    def finish(self) -> None:
        for stream in self._streams.values():
            stream.close()
        metrics = {} if self.tested else self.test_metrics()  # resumed after the last epoch's checkpoint
        if metrics:
            if self.rank == 0 and self.tracker is not None:
                self.tracker.log_metrics_buffered(metrics, step=self.max_epoch - 1)
            import ray.train

            ray.train.report({"step": self.state.global_step, **metrics})
        if self.tracker is not None:
            self._record_outages()
        if self.debug_dir:
            self._write_debug()

    def _record_outages(self) -> None:
        """Tell the run what a tracking-server outage cost: values sent late (with their own steps) and
        values lost (dropped from a full buffer, or still waiting because the server is down now)."""
        tracker = self.tracker
        sent = tracker.flush(wait_s=float(self.cfg.run.mlflow.get("outage_wait_s", 120.0)))
        lost = tracker.dropped + tracker.pending
        if tracker.sent_late or lost:
            _safe(tracker.set_tags, {"qformer.metrics_sent_late": tracker.sent_late, "qformer.metrics_lost": lost})
        if not sent:
            log.warning("MLflow: %d metric values could not be sent (server unreachable at the end)", lost)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, epoch: int, iters: int, epoch_complete: bool, metrics: dict[str, float]) -> None:
        import ray.train
        from ray.train import Checkpoint

        check_finite(self.state)
        report = {"epoch": epoch, "step": self.state.global_step, **metrics}
        score_key = self.config.get("score_key")
        if score_key and score_key not in report:
            report[score_key] = float("-inf")  # step checkpoints carry no validation score: kept only while latest
        name = f"epoch={epoch:04d}-step={self.state.global_step:08d}" + ("-end" if epoch_complete else "")
        positions = {n: t.settle(_gather_objects).to_dict() for n, t in self.positions.items()}  # collective
        if self.rank != 0:
            ray.train.report(report, checkpoint=None)
            return
        state = ckpt_io.build_state(self.unwrapped, self.state.optimizer, self.state.scheduler, self.state.scaler,
                                    self.config["cfg"], epoch=epoch, step=self.state.global_step, iters_in_epoch=iters,
                                    epoch_complete=epoch_complete, mlflow_run_id=self.run_id, data_position=positions)
        local_dir = self.config.get("local_checkpoint_root")
        if local_dir:  # Train local mode does not persist checkpoints: write them where they stay
            target = ckpt_io.save_dir(state, Path(local_dir) / name)
            ray.train.report(report, checkpoint=Checkpoint.from_directory(str(target)))
            _prune_local(Path(local_dir), int(self.run_cfg.keep_checkpoints))
            persisted = str(target)
        else:
            with tempfile.TemporaryDirectory(prefix="qformer-ckpt-") as tmp:
                ckpt_io.save_dir(state, tmp)
                ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
            persisted = _persisted_path(name)
        if self.tracker is not None:
            _safe(self.tracker.set_tags, {"last_checkpoint": persisted})

    def _maybe_inject_failure(self) -> None:
        if not self.fail_at or self.state.global_step != int(self.fail_at) or self.rank != 0:
            return
        marker = Path(self.fail_marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(self.state.global_step))
        raise InjectedFailure(f"injected failure at global step {self.state.global_step} (QFORMER_FAIL_ONCE_AT_STEP)")

    def _record_start(self, start: ckpt_io.ResumePoint) -> None:
        """One line per worker-group start (first start, restart, resize) for the elastic tests and bench."""
        out = Path(self.debug_dir)
        out.mkdir(parents=True, exist_ok=True)
        plan = self.plan
        record = {"time": time.time(), "world": self.world, "step": start.step, "epoch": start.epoch,
                  "iter_in_epoch": start.iter_in_epoch, "worker_batch": plan.worker_batch,
                  "micro_per_step": plan.micro_per_step, "accum_grad_iters": plan.accum_grad_iters,
                  "global_batch": plan.global_batch}
        with open(out / "starts.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _write_debug(self) -> None:
        """Per-rank fingerprints (weights, batches seen) for the distributed tests."""
        out = Path(self.debug_dir)
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: float(v.float().sum()) for k, v in self.unwrapped.trainable_state_dict().items()
                   if v.is_floating_point()}
        record = {"rank": self.rank, "world": self.world, "global_step": self.state.global_step,
                  "optimizer_steps": self.state.optimizer_steps, "lr": self.state.optimizer.param_groups[0]["lr"],
                  "batches": self.seen_batches, "weights": weights}
        (out / f"rank{self.rank}.json").write_text(json.dumps(record))


def pick_stream(ratios: dict[str, float], seed: int, epoch: int, i: int) -> str:
    """The training stream micro-batch `i` of `epoch` comes from, drawn by ratio (LAVIS's runner_iter
    MultiIterLoader). Seeded by (seed, epoch, i), so every rank draws the same without talking."""
    names = list(ratios)
    probs = np.array([ratios[n] for n in names], dtype=np.float64)
    rng = np.random.default_rng([seed, epoch, i])
    return names[int(rng.choice(len(names), p=probs / probs.sum()))]


def _gather_objects(obj: Any) -> list[Any]:
    """all_gather_object over the training ranks (just [obj] without a process group)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _grouped(batches: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive micro-batches, `size` at a time (one step's); an incomplete last group is dropped."""
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def _safe(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Tracking calls must not end a long run: a tracking-server outage costs metrics, not the training."""
    try:
        fn(*args, **kwargs)
    except Exception as err:
        log.warning("MLflow %s failed: %s", getattr(fn, "__name__", "call"), err)


def _fingerprint(batch: dict) -> str:
    ids = batch["text_ids"].detach().cpu().numpy()
    img = batch["image"].detach().cpu().numpy()
    return f"{int(ids.sum())}-{int(img.astype(np.int64).sum())}"


def _append_rows(path: Path, step: int, batch: dict) -> None:
    """Debug: one line per step with an id per row (its caption's token ids), appended at once so that a
    failed attempt's rows are kept too (the resume tests compare them)."""
    ids = [hash(tuple(row)) for row in batch["text_ids"].detach().cpu().tolist()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "ids": ids}) + "\n")


def _skipped_images() -> int:
    try:
        from qformer.data.stats import skipped_count

        return int(skipped_count())
    except Exception:  # the counter is informational
        return 0


def _persisted_path(name: str) -> str:
    import ray.train

    try:
        storage = ray.train.get_context().get_storage()
        return f"{storage.experiment_fs_path.rstrip('/')}/{name}"
    except Exception:
        return name


def _prune_local(root: Path, keep: int) -> None:
    dirs = sorted((d for d in root.iterdir() if (d / ckpt_io.META_FILE).is_file()),
                  key=lambda d: json.loads((d / ckpt_io.META_FILE).read_text()).get("step", 0))
    import shutil

    for old in dirs[: max(0, len(dirs) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)

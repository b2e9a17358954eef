"""The epoch / step loop of one training worker (LAVIS RunnerBase / RunnerIter, spec §5).

Reads as the idea: for each epoch, draw steps from the streams, run the train step on each micro-batch,
log every run.log_freq steps, checkpoint every run.save_freq_steps steps and at each epoch end (with
validation metrics), stop cleanly on a preemption notice. The components it calls own the details:
TrainingStreams (data and its positions), MetricLogger (MLflow + job log), CheckpointReporter (Ray
checkpoints), PreemptionGuard (the SIGTERM vote), TrainingAudit (run.data.audit_dir), and the evaluation
callable the launcher hands in (so `train` never imports `evaluate`).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from qformer.config.batch_plan import BatchPlan
from qformer.core.memory import release_freed_memory
from qformer.core.progress import Progress
from qformer.core.signals import note_training_finished
from qformer.train.audit import TrainingAudit
from qformer.train.checkpoint import ResumePoint
from qformer.train.checkpoint_reporter import CheckpointReporter
from qformer.train.loop_config import UNTRAINED, LoopConfig, call_hooks
from qformer.train.lr_schedule import schedule_max_epoch
from qformer.train.meters import LossMeter
from qformer.train.metric_logger import MetricLogger
from qformer.train.preemption import PreemptionGuard
from qformer.train.step import TrainState, check_finite, train_step
from qformer.train.streams import TrainingStreams


class TrainingLoop:
    def __init__(self, lc: LoopConfig, cfg: Any, state: TrainState, model: torch.nn.Module, plan: BatchPlan,
                 rank: int, world: int, saved_positions: dict | None) -> None:
        run = cfg.run
        self.lc, self.cfg, self.run_cfg, self.state, self.model, self.plan = lc, cfg, run, state, model, plan
        self.rank, self.world = rank, world
        self.iter_based = bool(run.get("max_iters"))
        self.max_epoch = schedule_max_epoch(run)
        self.log_freq, self.save_freq = max(1, int(run.log_freq)), int(run.save_freq_steps or 0)
        self.streams = TrainingStreams(run, plan, lc.ratios, lc.num_rows, lc.stream_plan, saved_positions, rank)
        self.metrics = MetricLogger(lc.tracking, rank, world, plan, float(run.mlflow.get("outage_wait_s", 120.0)),
                                    float(run.mlflow.get("system_metrics_s") or 0.0))
        self.checkpoints = CheckpointReporter(rank, lc.cfg, model, lc.score_key, lc.local_checkpoint_root,
                                              int(run.keep_checkpoints), lc.tracking.run_id if lc.tracking else None)
        elastic = lc.workers[0] != lc.workers[1]
        self.preemption = PreemptionGuard(bool(run.elastic.preemption_checkpoint), int(run.accum_grad_iters),
                                          grow=elastic and bool(run.elastic.grow_checkpoint))
        self.audit = TrainingAudit(lc.audit_dir, rank, world) if lc.audit_dir else None
        self.tested = False  # test splits evaluated (at the last epoch end, or in finish())

    def run(self, start: ResumePoint) -> None:
        if self.audit is not None:
            self.audit.record_start(start, self.plan)
        self.metrics.resume()
        if start.step == 0 and self.run_cfg.get("evaluate_untrained"):
            self.evaluate_untrained()
        inner = int(self.run_cfg.iters_per_inner_epoch) if self.iter_based else 0
        first_epoch = start.step // inner if self.iter_based else start.epoch  # runner_iter: from the step
        try:
            for epoch in range(first_epoch, self.max_epoch):
                if self.iter_based:
                    begin = start.step - epoch * inner if epoch == first_epoch else 0
                else:
                    begin = start.iter_in_epoch if epoch == start.epoch else 0
                self.train_epoch(epoch, begin)
        except BaseException:
            # Ray Data's iterators end now, while Ray is up: left to the interpreter's exit (after Ray's atexit
            # shutdown), their clean-up calls Ray again, which starts a new Ray there and hangs (Ctrl+C, Train
            # local mode)
            self.streams.close()
            raise
        self.finish()

    def train_epoch(self, epoch: int, begin: int) -> None:
        """Optimiser steps `begin`.. of `epoch` (each `plan.micro_per_step` micro-batches), then the epoch end."""
        self.state.model.train()
        length = self.streams.steps_per_epoch()
        bar = Progress(self.streams.expected_steps(), f"epoch {epoch}", "steps", initial=begin,
                       enabled=self.rank == 0, log_every_s=None)  # in a job log, log_step's lines are the progress
        # the stream starts the next epoch's pass while this one's last step trains (none after the last epoch)
        start_next = epoch + 1 < self.max_epoch and bool(self.run_cfg.data.get("next_pass_ahead", True))
        epoch_meter, steps, i = LossMeter(), self.streams.steps(epoch, begin, start_next), begin
        first_wait = None  # how long this epoch waited for its first step's data (rank 0's, logged at its end)
        self.metrics.start_window()
        try:
            while length is None or i < length:
                t0 = time.perf_counter()
                drawn = next(steps, None)
                waited = time.perf_counter() - t0
                self.metrics.waited(waited)
                first_wait = waited if first_wait is None else first_wait
                if drawn is None:
                    break
                group, last = drawn
                log_now = (self.state.global_step + 1) % self.log_freq == 0
                out = self.train_step(group, epoch, i, log_now, epoch_meter)
                self.metrics.log_world(self.state.global_step)  # once: where this world starts
                i += 1
                bar.update(1)
                if log_now:
                    check_finite(self.state)  # collective in error mode; also keeps the next checkpoint a good one
                    self.metrics.log_step(self.state, self.model, epoch, i, length, out, bar)
                    release_freed_memory(collect=False)  # the holes varying batch shapes leave in the heap
                if self.after_step(epoch, i, at_epoch_end=last or (length is not None and i >= length)):
                    break
        finally:  # on an exception too: see run()
            bar.close()
            steps.close()
        if i == begin == 0:  # (a resume at the very end of an epoch whose length was unknown has nothing left)
            raise RuntimeError(f"epoch {epoch} had no batches on rank {self.rank}: the training shard is empty or "
                               f"smaller than one batch of {self.plan.worker_batch}")
        self.end_epoch(epoch, i, epoch_meter, first_wait)
        if self.preemption.stopping and epoch < self.max_epoch - 1:  # after the last epoch: nothing to restart
            self.stop(epoch + 1, 0)

    def train_step(self, group: list[dict], epoch: int, i: int, log_now: bool, epoch_meter: LossMeter):
        """One optimiser step over its micro-batches; the last one's output carries the step's LR and norm."""
        for j, batch in enumerate(group):
            if self.audit is not None:
                self.audit.record_batch(self.state.global_step + 1, batch)
            out = train_step(self.state, batch, epoch, i, log=log_now and j == len(group) - 1, micro=j)
            self.metrics.window.update(out.losses)
            epoch_meter.update(out.losses)
        self.metrics.window_steps += 1
        return out

    def after_step(self, epoch: int, i: int, at_epoch_end: bool) -> bool:
        """Step checkpoints, the preemption vote and the step hooks; True ends the epoch early."""
        saved = False
        if self.save_freq and self.state.global_step % self.save_freq == 0 and not at_epoch_end:
            self.save(epoch, i, epoch_complete=False, metrics=self.metrics.last)
            saved = True
        if self.preemption.stop_agreed(i):
            if at_epoch_end:  # the epoch-end checkpoint is the one
                return True
            if not saved:
                self.save(epoch, i, epoch_complete=False, metrics=self.metrics.last)
            self.stop(epoch, i)
        call_hooks(self.lc.step_hooks, self.state.global_step, self.rank)
        return False

    def end_epoch(self, epoch: int, iters: int, epoch_meter: LossMeter, first_wait: float | None = None) -> None:
        check_finite(self.state)
        metrics = {f"train_epoch/{k}": v for k, v in epoch_meter.mean().items()}  # LAVIS: all-reduced averages
        if first_wait is not None:  # Ray Data's per-pass start, where nothing hid it (qformer.data.head_start)
            metrics["train_epoch/first_batch_wait_s"] = float(first_wait)
        run = self.run_cfg
        if list(run.valid_splits) and epoch % max(1, int(run.val_freq)) == 0:
            for split in run.valid_splits:
                metrics.update({f"{split}/{k}": v for k, v in self.evaluate(split).items()})
        if epoch == self.max_epoch - 1:  # test metrics ride on the final checkpoint's report (Ray keeps
            metrics.update(self.test_metrics())  # only metrics reported together with a checkpoint)
        self.metrics.log_epoch(metrics, epoch)
        self.save(epoch, iters, epoch_complete=True, metrics=metrics)

    def evaluate(self, split: str) -> dict[str, float]:
        if self.lc.evaluate is None:
            return {}
        release_freed_memory()  # the training steps' freed activations, before the evaluation's own buffers
        result = self.lc.evaluate(self.model, self.cfg, split, device=self.state.device, rank=self.rank,
                                  world=self.world, autocast_dtype=self.state.amp.dtype,
                                  tracker=self.metrics.tracker, step=self.state.global_step)
        release_freed_memory()
        self.state.model.train()
        return result

    def evaluate_untrained(self) -> None:
        """The model as initialised, before its first step (the demo's "before" column), in the training's run."""
        splits = list(self.run_cfg.test_splits) or list(self.run_cfg.valid_splits)
        metrics = {f"{UNTRAINED}/{split}/{k}": v for split in splits for k, v in self.evaluate(split).items()}
        self.metrics.log_final(metrics, step=0)

    def test_metrics(self) -> dict[str, float]:
        self.tested = True
        return {f"{split}/{k}": v for split in self.run_cfg.test_splits for k, v in self.evaluate(split).items()}

    def save(self, epoch: int, iters: int, epoch_complete: bool, metrics: dict[str, float]) -> None:
        check_finite(self.state)
        persisted = self.checkpoints.save(self.state, epoch, iters, epoch_complete, metrics,
                                          self.streams.settled_positions)
        if persisted is not None:
            self.metrics.tag({"last_checkpoint": persisted})

    def stop(self, epoch: int, i: int) -> None:
        self.metrics.note({self.preemption.marker: 1.0}, self.state.global_step)  # the UI shows where
        self.preemption.stop(self.state.global_step, epoch, i)

    def finish(self) -> None:
        note_training_finished()  # Ray's SIGTERM at the worker's exit is no preemption notice now
        self.streams.close()
        metrics = {} if self.tested else self.test_metrics()  # resumed after the last epoch's checkpoint
        if metrics:
            self.metrics.log_final(metrics, step=self.max_epoch - 1)
            self.checkpoints.report({"step": self.state.global_step, **metrics})
        self.metrics.close()
        if self.audit is not None:
            self.audit.write_summary(self.state, self.model)

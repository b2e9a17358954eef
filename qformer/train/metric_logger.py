"""Training metrics: the per-log-step window (losses, speed, data wait, LR, ...) and per-epoch metrics, into
MLflow on rank 0 and the job log. A tracking-server outage costs buffered metrics, never the training."""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from qformer.config.batch_plan import BatchPlan
from qformer.core.logs import get_logger
from qformer.data.stats import training_losses
from qformer.tracking.run_tracker import RunTracker
from qformer.tracking.uri import fail_fast_http
from qformer.train.loop_config import TrackingTarget
from qformer.train.meters import LossMeter, memory_metrics
from qformer.train.step import StepOutput, TrainState

log = get_logger("train")

# logged when they change: the epoch, the counters of skipped steps, the loss scale
SLOW_KEYS = frozenset({"epoch", "skipped_nonfinite", "skipped_overflow", "grad_scale", "skipped_images"})
# what the world size sets: logged once per worker group, at the first step it trains (see log_world)
WORLD_KEYS = ("world_size", "global_batch", "accum_grad_iters", "worker_batch")


class MetricLogger:
    def __init__(self, target: TrackingTarget | None, rank: int, world: int, plan: BatchPlan,
                 outage_wait_s: float, system_metrics_s: float = 0.0) -> None:
        self.rank, self.world, self.plan, self.outage_wait_s = rank, world, plan, outage_wait_s
        self.tracker: RunTracker | None = None
        self.system = None
        if rank == 0 and target is not None:
            fail_fast_http()
            self.tracker = RunTracker(target.uri, target.run_id)
            self.system = start_system_metrics(target, system_metrics_s)
        self.logged_through = 0  # steps up to this one are in MLflow already (a restart re-runs them)
        self.slow_values: dict[str, float] = {}  # the last logged value of each key in SLOW_KEYS
        self.world_logged = False
        self.window = LossMeter()
        self.last: dict[str, float] = {}  # loss and lr of the last log step (step checkpoints report them)
        self.start_window()

    def resume(self) -> None:
        """After a restart the steps since the checkpoint are re-run, but logged once."""
        if self.tracker is None:
            return
        try:
            self.logged_through = max((s for s, _ in self.tracker.metric_history("loss")), default=0)
        except Exception as err:  # noqa: BLE001 - informational: at worst a step is logged twice
            log.warning("MLflow: could not read the loss history (%s)", err)

    def start_window(self) -> None:
        self.window_start, self.window_wait, self.window_steps = time.perf_counter(), 0.0, 0

    def waited(self, seconds: float) -> None:
        """Time the loop waited for the next step's data (the log's `data wait`)."""
        self.window_wait += seconds

    def log_step(self, state: TrainState, model: torch.nn.Module, epoch: int, i: int, length: int | None,
                 out: StepOutput, bar: Any) -> None:
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        metrics: dict[str, Any] = dict(self.window.mean())
        metrics.update({
            "lr": out.lr,
            "temp": float(model.temp.detach()) if hasattr(model, "temp") else None,
            "samples_per_s": self.window_steps * self.plan.samples_per_step / elapsed,
            "data_wait_frac": min(1.0, self.window_wait / elapsed),
            "grad_norm": out.grad_norm,
            "epoch": float(epoch),
            "skipped_nonfinite": float(state.skipped_nonfinite),
            # fp16: the loss scale (halved at each overflow, doubled after run.amp_growth_interval good steps)
            # and the optimiser steps skipped for an overflow since this worker started
            "grad_scale": state.scaler.get_scale() if state.scaler is not None else None,
            "skipped_overflow": float(state.skipped_overflow) if state.scaler is not None else None,
        })
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if self.rank == 0:
            metrics.update(_skipped_images())
            metrics.update(memory_metrics(state.device))
            if self.tracker is not None and state.global_step > self.logged_through:
                self.tracker.log_metrics_buffered(self._changed(metrics), step=state.global_step)  # an outage buffers
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}", lr=f"{out.lr:.2e}", refresh=False)
            of = f"/{length}" if length else ""
            log.info("epoch %d iter %d%s step %d | loss %.4f (itc %.4f itm %.4f lm %.4f) | lr %.3e | %.1f samples/s | "
                     "data wait %.0f%%", epoch, i, of, state.global_step, metrics.get("loss", math.nan),
                     metrics.get("loss_itc", math.nan), metrics.get("loss_itm", math.nan),
                     metrics.get("loss_lm", math.nan), out.lr, metrics["samples_per_s"], 100 * metrics["data_wait_frac"])
        self.last = {k: metrics[k] for k in ("loss", "lr") if k in metrics}
        self.start_window()

    def log_world(self, step: int) -> None:
        """At this worker group's first trained step: world_size, global_batch, accum_grad_iters, worker_batch.
        A restart re-runs the steps since its checkpoint and keeps its own weights for them, so its world is
        logged at the step it starts from, also where an earlier group logged that step (MLflow appends; the
        value logged last at a step is the kept one): read as a step function, the series gives the world that
        trained each kept step, and every resize is a point at the step where the new world began."""
        if self.world_logged:
            return
        self.world_logged = True
        if self.tracker is not None:
            values = {"world_size": self.world, "global_batch": self.plan.global_batch,
                      "accum_grad_iters": self.plan.accum_grad_iters, "worker_batch": self.plan.worker_batch}
            self.tracker.log_metrics_buffered({k: float(values[k]) for k in WORLD_KEYS}, step=step)

    def _changed(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """What goes to MLflow: SLOW_KEYS only when they change (and at this worker's first logged step): a chart
        of a constant per step says nothing, a point where the world size or the loss scale changed does."""
        kept = {k: v for k, v in metrics.items() if k not in SLOW_KEYS or self.slow_values.get(k) != v}
        self.slow_values.update({k: v for k, v in kept.items() if k in SLOW_KEYS})
        return kept

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        """Per-epoch metrics (the epoch is their step) and the re-drawn loss curves."""
        if self.rank != 0:
            return
        if self.tracker is not None:
            self.tracker.log_metrics_buffered(metrics, step=epoch)
            safe(self.tracker.log_loss_curve)
        log.info("epoch %d done: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))

    def log_final(self, metrics: dict[str, float], step: int) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics_buffered(metrics, step=step)

    def note(self, metrics: dict[str, float], step: int) -> None:
        """A single marker value (e.g. where a preemption checkpoint was taken)."""
        if self.tracker is not None:
            safe(self.tracker.log_metrics_buffered, metrics, step=step)

    def tag(self, tags: dict[str, Any]) -> None:
        if self.tracker is not None:
            safe(self.tracker.set_tags, tags)

    def close(self) -> None:
        """Tell the run what a tracking-server outage cost: values sent late (with their own steps) and
        values lost (dropped from a full buffer, or still waiting because the server is down now)."""
        if self.system is not None:
            safe(self.system.finish)
            self.system = None
        tracker = self.tracker
        if tracker is None:
            return
        sent = tracker.flush(wait_s=self.outage_wait_s)
        lost = tracker.dropped + tracker.pending
        if tracker.sent_late or lost:
            safe(tracker.set_tags, {"qformer.metrics_sent_late": tracker.sent_late, "qformer.metrics_lost": lost})
        if not sent:
            log.warning("MLflow: %d metric values could not be sent (server unreachable at the end)", lost)


def safe(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Tracking calls must not end a long run: a tracking-server outage costs metrics, not the training."""
    try:
        fn(*args, **kwargs)
    except Exception as err:
        log.warning("MLflow %s failed: %s", getattr(fn, "__name__", "call"), err)


def start_system_metrics(target: TrackingTarget, interval_s: float) -> Any:
    """MLflow's system metrics (`system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes`,
    disk, network, `system/gpu_*` where a GPU is) of the rank-0 worker's node, every `interval_s`, into the
    run (the UI's System metrics tab); continued after a restart. None when off or unavailable."""
    if interval_s <= 0:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(target.run_id, sampling_interval=interval_s, resume_logging=True,
                                       tracking_uri=target.uri)
        monitor.start()
        return monitor
    except Exception as err:  # noqa: BLE001 - informational, never the training's concern
        log.warning("MLflow system metrics not recorded: %s", err)
        return None


def _skipped_images() -> dict[str, float]:
    """`skipped_images`: training samples lost so far in the run (across restarts and resumes), and one
    `skipped_images/<reason>` per reason that occurred (qformer.data.stats)."""
    try:
        by_reason = training_losses()
    except Exception:  # noqa: BLE001 - the count is informational
        return {}
    return {"skipped_images": float(sum(by_reason.values())),
            **{f"skipped_images/{reason}": float(n) for reason, n in sorted(by_reason.items()) if n}}

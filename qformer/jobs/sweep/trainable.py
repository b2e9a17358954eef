"""One Tune trial: the base config + this trial's sampled values, trained by the `qformer train` code path.

Train V2 has no `Tuner(TorchTrainer)`: the trial is a Tune *function* trainable that builds the
TorchTrainer through the training launcher and fits it, with Tune's report callback (constructed
here, inside the trial: outside a Tune session it raises) forwarding rank 0's reports to Tune.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.utils import flatten_dict

from qformer.config import load_config
from qformer.core.logs import setup_logging
from qformer.jobs.sweep.overrides import format_value, sampled_options
from qformer.jobs.sweep.spec import SweepSpec
from qformer.jobs.train_job import launch_training


@dataclass(frozen=True)
class TrialPlumbing:
    """Per-sweep settings every trial needs but that are not part of the trained config."""

    parent_run_id: str | None  # MLflow parent (sweep) run; None when MLflow is off
    tracking_uri: str | None  # the sweep's server URI while it runs (see mlflow_server.py)
    train_storage_path: str | None  # Train run storage (shared across nodes); None: the launcher's default


class MetricReportCallback(TuneReportCallback):
    """Forward only the reports that carry the sweep metric (the evaluation reports).

    Training also reports at plain log/checkpoint steps; Tune rejects a result without its metric
    (strict metric checking), and each forwarded report is one `training_iteration`, so with this
    filter ASHA's rungs count evaluations. The count is set from the report's epoch: a restored trial
    (`--resume`) resumes its Train run mid-way, while Tune's own count would start over at 1.
    """

    def __init__(self, metric: str, valid_splits: list[str], val_freq: int) -> None:
        super().__init__()
        self._metric, self._valid_splits, self._val_freq = metric, list(valid_splits), val_freq

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        result = self.tune_result(metrics[0]) if metrics else None
        if result is not None:
            super().after_report(run_context, [result, *metrics[1:]], checkpoint)

    def tune_result(self, report: dict[str, Any]) -> dict[str, Any] | None:
        """The Tune result of a rank-0 report: None unless it carries the metric; its iteration set."""
        if not carries_metric(report, self._metric):
            return None
        iteration = evaluation_count(report, self._metric, self._valid_splits, self._val_freq)
        # Tune keeps a reported training_iteration (it only fills a missing one)
        return report if iteration is None else {**report, "training_iteration": iteration}

    def report_finished(self, metrics: dict[str, Any], checkpoint_path: str | None) -> None:
        """A restored trial whose Train run had already finished (it completed its last epoch while the sweep
        was being stopped) trains nothing; its final report goes to Tune again, from the trial itself, so the
        trial ends with its last result and iteration count."""
        result = self.tune_result({**metrics, **({"checkpoint_path": checkpoint_path} if checkpoint_path else {})})
        if result is not None:
            ray.tune.report(result)


def evaluation_count(report: dict[str, Any], metric: str, valid_splits: list[str], val_freq: int) -> int | None:
    """Which report of `metric` an epoch-end report is (1-based): train_epoch/* comes every epoch, a
    validation split's metrics every val_freq-th (epochs 0, f, 2f, ...). None when the report has no epoch."""
    epoch = report.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
        return None
    if any(metric.startswith(f"{split}/") for split in valid_splits):  # also <dataset>/<split>/<metric>
        return int(epoch) // max(1, val_freq) + 1
    return int(epoch) + 1 if metric.startswith("train_epoch/") else None


def carries_metric(report: dict[str, Any], metric: str) -> bool:
    """Whether a rank-0 report holds a finite value of `metric` (nested dicts read as "a/b").

    Step checkpoints carry the checkpoint score key as -inf (no evaluation ran): not a result to rank on.
    """
    value = flatten_dict(dict(report)).get(metric)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def train_run_name(spec: SweepSpec, trial_id: str) -> str:
    """Deterministic per trial: a retried or restored trial resumes its own Train run and checkpoints."""
    return f"{spec.name}_{trial_id}"


def trial_options(spec: SweepSpec, sampled: dict[str, Any], trial_id: str, plumbing: TrialPlumbing) -> list[str]:
    run_name = train_run_name(spec, trial_id)
    options = [*spec.base_options, *sampled_options(sampled), f"run.ray.name={run_name}",
               f"run.mlflow.run_name={run_name}"]
    if plumbing.tracking_uri:
        options.append(f"run.mlflow.tracking_uri={format_value(plumbing.tracking_uri)}")
    if plumbing.train_storage_path:
        options.append(f"run.ray.storage_path={format_value(plumbing.train_storage_path)}")
    return options


def train_trial(config: dict[str, Any], *, spec: SweepSpec, plumbing: TrialPlumbing) -> None:
    """The Tune function trainable (wrap with tune.with_parameters(train_trial, spec=..., plumbing=...))."""
    setup_logging()
    trial_id = ray.tune.get_context().get_trial_id()
    sampled = {key: config[key] for key in spec.search_space}
    cfg = load_config(str(spec.base_path), trial_options(spec, sampled, trial_id, plumbing))
    # Exactly `qformer train`'s entry point; the trial's run name (run.ray.name) makes a retry resume, and
    # its MLflow run is opened nested under the sweep's parent run.
    callback = MetricReportCallback(spec.metric, list(cfg.run.valid_splits), int(cfg.run.val_freq))
    result = launch_training(cfg, callbacks=[callback], parent_run_id=plumbing.parent_run_id)
    if result.finished and result.metrics:
        callback.report_finished(result.metrics, result.checkpoint_path)

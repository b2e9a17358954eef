"""Sweep reports: best trial, CSV, printed table, plot, best-config YAML, early-stop flag, trial options."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from qformer.config import load_config
from qformer.jobs.sweep import results
from qformer.jobs.sweep.best_config import resolve_trial_config, retrain_command, write_best_config
from qformer.jobs.sweep.early_stop import FLAG, EarlyStopMarker
from qformer.jobs.sweep.results import TrialRow
from qformer.jobs.sweep.spec import load_sweep
from qformer.jobs.sweep.trainable import TrialPlumbing, carries_metric, evaluation_count, train_run_name, trial_options

REPO = Path(__file__).resolve().parents[1]
TINY_SWEEP = REPO / "experiments" / "sweeps" / "tiny_lr_queries.yaml"


@pytest.fixture(scope="module")
def spec():
    return load_sweep(TINY_SWEEP)


def rows() -> list[TrialRow]:
    mk = lambda tid, lr, q, m, it, early, status="ok": TrialRow(  # noqa: E731
        tid, {"run.init_lr": lr, "model.num_query_token": q}, m, it, early, status)
    return [
        mk("a_00000", 1e-4, 4, 40.0, 3, False),
        mk("a_00001", 1e-6, 8, 10.0, 1, True),
        mk("a_00002", 3e-3, 8, 55.5, 3, False),
        mk("a_00003", 1e-2, 4, None, 0, False, "error"),
        mk("a_00004", 2e-3, 4, math.nan, 1, True),
    ]


def test_best_row_respects_mode_and_skips_errors_and_nan():
    assert results.best_row(rows(), "max").trial_id == "a_00002"
    assert results.best_row(rows(), "min").trial_id == "a_00001"
    assert results.best_row([r for r in rows() if r.metric is None], "max") is None


def test_csv_has_one_row_per_trial(spec, tmp_path):
    path = results.write_csv(rows(), spec, tmp_path / "r" / "results.csv")
    with open(path) as fh:
        table = list(csv.DictReader(fh))
    assert [r["trial"] for r in table] == [r.trial_id for r in rows()]
    assert table[0]["run.init_lr"] == "0.0001" and table[0]["model.num_query_token"] == "4"
    assert table[1]["stopped_early"] == "True" and table[2][spec.metric] == "55.5"
    assert table[3]["status"] == "error"


def test_printed_table_marks_best_and_early_stops(spec):
    text = results.format_table(rows(), spec, results.best_row(rows(), "max"))
    lines = text.splitlines()
    assert "init_lr" in lines[0] and "num_query_token" in lines[0] and "stopped early" in lines[0]
    best_line = next(line for line in lines if "a_00002" in line)
    assert best_line.startswith("*") and "55.5" in best_line
    assert "yes" in next(line for line in lines if "a_00001" in line)
    assert len(lines) == 2 + len(rows())


def test_plot_is_a_png(spec, tmp_path):
    assert results.plot_axes(spec) == ("run.init_lr", "model.num_query_token")
    path = results.plot_metric(rows(), spec, tmp_path / "plot.png")
    from PIL import Image

    with Image.open(path) as img:  # a real picture: decodes, and is not one flat colour
        assert img.format == "PNG" and min(img.size) > 100
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or ()) > 10


def test_best_config_is_a_ready_to_run_experiment(spec, tmp_path):
    sampled = {"run.init_lr": 2.5e-4, "model.num_query_token": 8}
    path = write_best_config(spec, sampled, "a_00001", tmp_path / "best.yaml", header="best trial x\nretrain: ...")
    assert path.read_text().startswith("# best trial x\n# retrain: ...\n")
    cfg = load_config(str(path))
    assert cfg.run.init_lr == pytest.approx(2.5e-4) and cfg.model.num_query_token == 8
    assert cfg.run.max_steps_per_epoch == 2  # the sweep's base options are baked in
    from omegaconf import OmegaConf

    from qformer.jobs.train_job import run_name

    trial = resolve_trial_config(spec, sampled)
    # its own run: not the base experiment's output_dir and Ray run name (retraining would resume that run)
    assert cfg.run.output_dir == f"{trial.run.output_dir}/sweeps/tiny_lr_queries/best_a_00001"
    assert run_name(cfg) == cfg.run.mlflow.run_name == "tiny_lr_queries_best_a_00001" != run_name(trial)
    trial.run.output_dir, trial.run.ray.name, trial.run.mlflow.run_name = (
        cfg.run.output_dir, cfg.run.ray.name, cfg.run.mlflow.run_name)
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(trial)  # otherwise what the trial trained
    assert retrain_command(path) == f"qformer train --cfg-path {path}"


def test_trial_options_are_deterministic_and_carry_plumbing(spec):
    plumbing = TrialPlumbing(parent_run_id="p", tracking_uri="http://127.0.0.1:5555", train_storage_path="/shared/x")
    sampled = {"run.init_lr": 1e-4, "model.num_query_token": 4}
    opts = trial_options(spec, sampled, "abc_00001", plumbing)
    assert opts == trial_options(spec, sampled, "abc_00001", plumbing)
    cfg = load_config(str(spec.base_path), opts)
    assert cfg.run.ray.name == train_run_name(spec, "abc_00001") == "tiny_lr_queries_abc_00001"
    assert cfg.run.mlflow.run_name == cfg.run.ray.name
    assert cfg.run.mlflow.tracking_uri == "http://127.0.0.1:5555" and cfg.run.ray.storage_path == "/shared/x"
    assert cfg.run.init_lr == pytest.approx(1e-4) and cfg.model.num_query_token == 4


def test_early_stop_marker_flags_scheduler_stops():
    marker = EarlyStopMarker()
    stopped = {"training_iteration": 1, "done": True}  # a STOP decision sets done before callbacks run
    last_rung = {"training_iteration": 3, "done": True}  # cut at the top rung: killed before it ended
    running = {"training_iteration": 1, "done": False}
    for result in (stopped, last_rung, running):
        marker.on_trial_result(0, [], None, result)
    assert stopped.get(FLAG) is True and last_rung.get(FLAG) is True and FLAG not in running


def test_only_evaluation_reports_reach_tune():
    assert carries_metric({"epoch": 0, "val/r_mean": 41.5}, "val/r_mean")
    assert carries_metric({"val": {"r_mean": 41.5}}, "val/r_mean")  # nested, as Tune flattens it
    assert not carries_metric({"step": 10, "loss": 3.0}, "val/r_mean")  # a plain step report
    assert not carries_metric({"step": 10, "val/r_mean": float("-inf")}, "val/r_mean")  # step checkpoint
    assert not carries_metric({"val/r_mean": float("nan")}, "val/r_mean")


def test_driver_callbacks_override_real_tune_hooks():
    from ray.tune import Callback

    from qformer.jobs.sweep.placement_groups import PlacementGroupReaper

    for cls, hook in ((PlacementGroupReaper, "on_step_end"), (EarlyStopMarker, "on_trial_result")):
        assert hasattr(Callback, hook) and getattr(cls, hook) is not getattr(Callback, hook)


@pytest.mark.parametrize("metric, epoch, val_freq, count", [
    ("train_epoch/loss", 0, 1, 1), ("train_epoch/loss", 4, 3, 5),  # every epoch
    ("val/r_mean", 0, 1, 1), ("val/r_mean", 2, 1, 3),
    ("val/r_mean", 0, 2, 1), ("val/r_mean", 4, 2, 3),  # evaluations at epochs 0, 2, 4
    ("test/r_mean", 4, 1, None), ("val/r_mean", None, 1, None),  # no epoch count to give: Tune counts
])
def test_evaluation_count_follows_the_epoch_not_the_restart(metric, epoch, val_freq, count):
    """A trial resumed at epoch 2 reports its third evaluation as iteration 3, not 1 (ASHA's rungs count these)."""
    report = {"step": 10, metric: 0.5, **({"epoch": epoch} if epoch is not None else {})}
    assert evaluation_count(report, metric, ["val"], val_freq) == count

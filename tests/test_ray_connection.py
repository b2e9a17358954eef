"""Which local Ray a run starts (qformer.jobs.ray_cluster): the demo's, in Train local mode, has no dashboard."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import data_config
from qformer.config import load_config
from qformer.data.synth import coco_caption_section
from qformer.jobs.ray_cluster import wants_dashboard
from qformer.jobs.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo" / "tiny_shapes.yaml"


def test_the_demo_starts_its_local_ray_without_the_dashboard():
    cfg = load_config(str(DEMO))
    assert cfg.run.ray.num_workers == 0 and cfg.run.ray.dashboard is False
    assert wants_dashboard(cfg) is False


@pytest.mark.parametrize("options", [["run.ray.num_workers=1"], ["run.ray.num_workers=[1,2]"]])
def test_train_workers_get_the_dashboard_whatever_run_ray_dashboard_says(options):
    """Train's placement-group cleaner polls the dashboard's State API; without it a worker run warns every
    few seconds ("Failed to query Ray Train Controller actor state")."""
    assert wants_dashboard(load_config(str(DEMO), options)) is True


def test_the_sweep_over_the_demo_gets_the_dashboard():
    spec = load_sweep(REPO / "experiments" / "sweeps" / "tiny_lr_queries.yaml")
    assert wants_dashboard(load_config(str(DEMO), spec.base_options)) is True


def test_by_default_even_a_local_mode_run_gets_the_dashboard(tmp_path):
    cfg = data_config(coco_caption_section(tmp_path), ray={"num_workers": 0})
    assert cfg.run.ray.dashboard is True and wants_dashboard(cfg) is True

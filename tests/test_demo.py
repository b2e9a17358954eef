"""`qformer demo` end to end, shortened by --options: data present -> train on local Ray -> retrieval before/after."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import tiny_options
from qformer.core import paths

pytestmark = pytest.mark.ray


def test_demo_trains_and_reports_before_after(ray_cluster, tiny_bert, tmp_path, capsys, monkeypatch):
    from qformer.data.synth import write_synthetic
    from qformer.jobs.demo import run_demo

    root = paths.data_root(None) / "synth_shapes"  # where experiments/demo/tiny_shapes.yaml points
    write_synthetic(root, n_train=8, n_val=4, n_test=4, image_size=64, captions_per_image=2)
    stamp = (root / "annotations" / "coco_karpathy_train.json").stat().st_mtime_ns
    options = ["run.max_epoch=1", "run.max_steps_per_epoch=2", "run.batch_size_train=4", "run.batch_size_eval=4",
               "run.valid_splits=[]", "run.k_test=2", "run.log_freq=1", *tiny_options(tiny_bert),
               f"run.output_dir={tmp_path}/demo", f"run.mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
               "run.data.batch_size=8", "run.mlflow.system_metrics_s=0.5"]
    summary = run_demo(None, options)
    assert (root / "annotations" / "coco_karpathy_train.json").stat().st_mtime_ns == stamp  # not regenerated
    assert summary["split"] == "test"
    for side in ("before", "after"):  # 4 test images x 2 captions: any ranking puts every image in a top 5
        m = summary[side]
        assert m["img_r5"] == m["img_r10"] == m["txt_r10"] == 100.0, m
        assert m["txt_r_mean"] == pytest.approx((m["txt_r1"] + m["txt_r5"] + m["txt_r10"]) / 3)
        assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)
    # after: what the training run evaluated at its end and logged
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"]).data.metrics
    assert {k: logged.get(f"test/{k}") for k in summary["after"]} == pytest.approx(summary["after"])
    # before: the untrained model's evaluation, logged into the same run
    assert {k: logged.get(f"untrained/test/{k}") for k in summary["before"]} == pytest.approx(summary["before"])
    assert Path(summary["checkpoint"], "checkpoint.pth").is_file()
    out = capsys.readouterr().out
    assert "=== qformer demo ===" in out and f"run {summary['mlflow_run_id']}" in out
    assert "qformer ui --tracking-uri sqlite:///" in out and " -> " in out
    # the pictures: named in the printout, logged in the run, drawn as a person would want them
    assert summary["gallery"].endswith("/retrieval_gallery.png") and summary["gallery"] in out
    assert summary["attention"].endswith("/query_attention.png") and summary["attention"] in out
    _check_demo_pictures(summary, tmp_path)
    # the same command again: the finished run is left alone and its table printed from MLflow at once: no Ray
    # started, nothing trained or evaluated
    import qformer.jobs.demo as demo

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished demo's re-run started Ray, trained or evaluated")

    for name in ("connect_ray", "launch_training", "evaluate_untrained", "evaluate_checkpoint"):
        monkeypatch.setattr(demo, name, must_not_run)
    again = run_demo(None, options)
    second = capsys.readouterr().out
    assert "already finished" in second and "stored results" in second
    assert again["mlflow_run_id"] == summary["mlflow_run_id"] and again["checkpoint"] == summary["checkpoint"]
    assert again["before"] == pytest.approx(summary["before"]) and again["after"] == pytest.approx(summary["after"])
    table = [line for line in second.splitlines() if " -> " in line]
    assert table == [line for line in out.splitlines() if " -> " in line]  # the same numbers, printed the same
    _check_ui_shows_the_run(summary, tmp_path)


def _check_ui_shows_the_run(summary: dict, tmp_path: Path) -> None:
    """What a person sees: `qformer ui` on the demo's store, pages rendered by a real (headless) browser at the
    URLs the platform prints: the runs table in MLflow's model-training view lists the run, and the run's
    System metrics tab lists the worker's system metrics."""
    from mlflow.tracking import MlflowClient

    from browser import page_text, running_ui
    from qformer.tracking.uri import runs_table_path

    run = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"])
    system = sorted(k for k in run.data.metrics if k.startswith("system/"))
    assert "system/cpu_utilization_percentage" in system, sorted(run.data.metrics)
    with running_ui(summary["tracking_uri"], tmp_path / "ui-home") as (_, port, lines):
        run_page = next(line for line in lines if line.startswith("latest run:")).split()[-1]
        assert run_page.endswith(f"/runs/{run.info.run_id}?workflowType=machine_learning")
        table = page_text(f"http://127.0.0.1:{port}{runs_table_path(run.info.experiment_id)}",
                          expect=(run.info.run_name,))
        assert run.info.run_name in table and "1 matching run" in table, table
        # the model-training sidebar (Runs, Models, Model registry), not the GenAI one (Judges, Evaluation runs)
        assert "Model registry" in table and "Judges" not in table, table
        metrics_tab = page_text(run_page.replace("?", "/system-metrics?"), expect=("cpu_utilization_percentage",))
        assert f"System metrics ({len(system)})" in metrics_tab, metrics_tab
        assert "cpu_utilization_percentage" in metrics_tab, metrics_tab


def _check_demo_pictures(summary: dict, tmp_path: Path) -> None:
    """Read the demo run's gallery and attention grid back from MLflow and check what they show."""
    import json

    import numpy as np
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from qformer.data.images import load_rgb
    from qformer.evaluate.attention_grid import render_attention_grid
    from qformer.evaluate.drawing import BACKGROUND, CORRECT, WRONG
    from qformer.evaluate.gallery import Gallery, render_gallery

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    run_id = summary["mlflow_run_id"]
    folder = summary["gallery"].rsplit("/", 1)[0]
    assert folder.startswith("visuals/test/step_")
    local = Path(client.download_artifacts(run_id, folder, str(tmp_path / "pictures")))
    gallery_png = Image.open(local / "retrieval_gallery.png")
    gallery = Gallery.from_dict(json.loads((local / "retrieval_gallery.json").read_text()))

    # 4 test images: every caption's top 5 holds all 4 images, its own among them; each image gets 5 captions
    assert len(gallery.text_to_image) == 4 and len(gallery.image_to_text) == 4
    assert all(len(row.hits) == 4 and sum(h.correct for h in row.hits) == 1 for row in gallery.text_to_image)
    redrawn, marks = render_gallery(gallery, load_rgb)
    assert gallery_png.size == redrawn.size and gallery_png.mode == "RGB"
    assert len(marks) == 4 * 4 + 4 * 5  # image tiles + caption boxes
    for mark in marks:  # the marks in the logged picture, where the layout puts them
        x0, y0, x1, _ = mark.box
        assert gallery_png.getpixel(((x0 + x1) // 2, y0 + 1)) == (CORRECT if mark.correct else WRONG)
    assert sum(m.correct for m in marks if m.kind == "image") == 4
    assert np.array_equal(np.asarray(gallery_png), np.asarray(redrawn))  # the same picture, nothing else drawn

    grid_png = Image.open(local / "query_attention.png")
    queries = 4  # model.num_query_token
    blank = [np.zeros((3, 64, 64), np.uint8)] * 3
    layout, tiles = render_attention_grid(blank, np.zeros((3, queries, 8, 8)), ["a"] * 3)  # the same layout
    assert len(tiles) == 3 * (1 + queries)  # 3 images, each beside one map per query
    assert grid_png.size == layout.size
    for t in tiles:  # every tile holds a picture, not background
        crop = np.asarray(grid_png.crop((t.box[0], t.box[1], t.box[2] + 1, t.box[3] + 1)))
        assert (crop != np.array(BACKGROUND, np.uint8)).any(axis=-1).mean() > 0.9

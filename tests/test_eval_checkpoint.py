"""Evaluating a saved checkpoint reproduces the end-of-run evaluation of the training that wrote it.

Real Ray Train (the training in Train local mode; `qformer eval` on one Ray Train worker), real MLflow
(sqlite), the tiny model and a small synthetic shapes set.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qformer.core.errors import CheckpointError
from helpers import tiny_config, tiny_run

pytestmark = pytest.mark.ray

METRIC_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean",
               "agg_metrics")


def _cfg(bert: Path, shapes: Path, tmp_path: Path, **run):
    from qformer.data.synth import coco_caption_section

    return tiny_config(bert, coco_caption_section(shapes), tiny_run(
        tmp_path, "run", init_lr=1e-3, warmup_steps=0, max_steps_per_epoch=3, k_test=3, test_splits=["test"],
        mlflow={"experiment_name": "test-eval"}, data={"batch_size": 8}, **run))


def _latest_checkpoint(run_dir: Path) -> str:
    """Local-mode training's newest checkpoint dir (its final report carries test metrics, no checkpoint)."""
    from qformer.train.checkpoint import read_meta

    dirs = [m.parent for m in run_dir.rglob("meta.json")]
    assert dirs, f"no checkpoint under {run_dir}"
    return str(max(dirs, key=lambda d: int(read_meta(d).get("step") or 0)))


def test_checkpoint_eval_equals_end_of_training_eval(ray_cluster, tiny_bert, shapes, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from qformer.cli import main
    from qformer.evaluate.visuals import ARTIFACT_ROOT
    from qformer.jobs.eval_job import evaluate_checkpoint
    from qformer.jobs.train_job import launch_training
    from qformer.tracking.run_tracker import artifact_files

    def visual_artifacts(uri, run_id):
        return artifact_files(uri, run_id, ARTIFACT_ROOT, ".png")

    import shutil

    data = tmp_path / "shapes"  # the session's set with one test image corrupt: every evaluation skips it
    shutil.copytree(shapes, data)
    sorted((data / "images" / "test").glob("*.jpg"))[0].write_bytes(b"not a jpeg")
    cfg = _cfg(tiny_bert, data, tmp_path, valid_splits=["val"])
    trained = launch_training(cfg, local_mode=True)
    assert trained.error is None
    client = MlflowClient(tracking_uri=cfg.run.mlflow.tracking_uri)
    # every evaluation of the training run left its pictures: val after the epoch, test at the end (step 3)
    pictures = set(visual_artifacts(cfg.run.mlflow.tracking_uri, trained.mlflow_run_id))
    assert pictures == {f"visuals/{split}/step_00000003/{name}" for split in ("val", "test")
                        for name in ("retrieval_gallery.png", "query_attention.png")}
    checkpoint = trained.checkpoint_path or _latest_checkpoint(Path(trained.storage_path) / trained.name)
    at_end = {k: trained.metrics[f"test/{k}"] for k in METRIC_KEYS}

    # in this process, from the Ray checkpoint directory and from the .pth inside it
    for source in (checkpoint, str(Path(checkpoint) / "checkpoint.pth")):
        got = evaluate_checkpoint(cfg, source, ["test"], track=False, local=True).metrics
        assert {k: got[f"test/{k}"] for k in METRIC_KEYS} == pytest.approx(at_end, abs=1e-9)

    # `qformer eval` on a Ray Train worker, logged as its own MLflow run
    yaml_path = tmp_path / "exp.yaml"
    from omegaconf import OmegaConf

    yaml_path.write_text(OmegaConf.to_yaml(cfg))
    rc = main(["eval", "--cfg-path", str(yaml_path), "--checkpoint", checkpoint,
               "--options", "run.ray.num_workers=1", "run.ray.resources_per_worker={CPU: 0.5}"])
    assert rc == 0
    assert "picture: visuals/test/retrieval_gallery.png" in capsys.readouterr().out
    exp = client.get_experiment_by_name("test-eval")
    evals = client.search_runs([exp.experiment_id], filter_string="tags.`qformer.kind` = 'eval'")
    assert len(evals) == 1
    run = evals[0]
    assert run.info.run_id != trained.mlflow_run_id and run.info.status == "FINISHED"
    assert run.data.tags["qformer.checkpoint"] == str(Path(checkpoint).resolve())
    assert {k: run.data.metrics[f"test/{k}"] for k in METRIC_KEYS} == pytest.approx(at_end, abs=1e-9)
    assert run.data.params["run.k_test"] == "3"
    assert run.data.metrics["test/skipped_images"] == 1.0 == trained.metrics["test/skipped_images"]
    # the pictures came back from the Ray worker into the eval run, beside a readable gallery record
    assert set(visual_artifacts(cfg.run.mlflow.tracking_uri, run.info.run_id)) == {
        "visuals/test/retrieval_gallery.png", "visuals/test/query_attention.png"}
    record = Path(client.download_artifacts(run.info.run_id, "visuals/test/retrieval_gallery.json", str(tmp_path)))
    assert len(json.loads(record.read_text())["text_to_image"]) == 4

    # `qformer eval --local`: the same pictures, drawn in this process
    local = evaluate_checkpoint(cfg, checkpoint, ["test"], local=True)
    assert set(visual_artifacts(local.tracking_uri, local.mlflow_run_id)) == {
        "visuals/test/retrieval_gallery.png", "visuals/test/query_attention.png"}


def test_bad_checkpoints_are_named_and_lavis_style_files_load(tiny_bert, shapes, tmp_path):
    from qformer.jobs.eval_job import evaluate_checkpoint
    from qformer.models import build_model

    cfg = _cfg(tiny_bert, shapes, tmp_path)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": {"some.other.weight": torch.zeros(2)}}, wrong)
    with pytest.raises(ValueError, match="matches none"):
        evaluate_checkpoint(cfg, wrong, ["test"], track=False, local=True)
    with pytest.raises(CheckpointError, match="nope.pth does not exist"):
        evaluate_checkpoint(cfg, tmp_path / "nope.pth", ["test"], track=False, local=True)

    # a LAVIS-style file ({"model": trainable state dict} only) loads and evaluates
    torch.manual_seed(0)
    model = build_model(cfg.model)
    lavis_file = tmp_path / "lavis_style.pth"
    torch.save({"model": model.trainable_state_dict(), "epoch": 9}, lavis_file)
    got = evaluate_checkpoint(cfg, lavis_file, ["test"], track=False, local=True).metrics
    assert set(got) == {f"test/{k}" for k in METRIC_KEYS} | {"test/skipped_images"}

"""End-to-end training on real Ray Train V2 + real MLflow (sqlite), CPU, the tiny model at 64 px, a few steps.

- Train local mode: MLflow params/metrics/artifacts, LAVIS checkpoint layout, LR at chosen steps, and
  resume after a crash (re-launch with the same name continues step count, LR and the MLflow run).
Two DDP workers (in sync, disjoint data, a killed one restarting the group from the last checkpoint) are
tests/chaos/test_process_kills.py's SIGKILL test.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from omegaconf import OmegaConf

from qformer.config import ConfigError, load_config_dict
from helpers import merged, tiny_config, tiny_run
from step_hooks import FailOnceAtStep

pytestmark = pytest.mark.ray


def _cfg(bert: Path, shapes: Path, tmp_path: Path, name: str, run_over: dict, model: dict | None = None):
    from qformer.data.synth import coco_caption_section

    run = tiny_run(tmp_path, name, **{"max_epoch": 2, "warmup_steps": 4, "data": {"batch_size": 8},
                                      "mlflow": {"experiment_name": "test-train"}})
    return tiny_config(bert, coco_caption_section(shapes), merged(run, run_over), model)


# fp16 as on a GPU: an EVA ViT converted to fp16, fp16 autocast and a GradScaler, on the CPU. The loss scale
# starts at 2^12 and doubles after every good step (growth interval 1), so it is known exactly until the first
# overflow (none is possible below 2^15 at batch 4) and certain to overflow within the 9 steps trained below.
FP16_MODEL = {"vit_model": "eva_clip_g", "vit_precision": "fp16",
              "vit_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}
FP16_RUN = {"amp": True, "amp_dtype": "fp16", "amp_init_scale": 2.0**12, "amp_growth_interval": 1}


def _client(cfg):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.run.mlflow.tracking_uri)


def _metric(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _cos(epoch: int, max_epoch: int, init: float = 1e-4, low: float = 1e-5) -> float:
    return (init - low) * 0.5 * (1 + math.cos(math.pi * epoch / max_epoch)) + low


def test_local_mode_mlflow_checkpoint_and_resume_after_crash(ray_cluster, tiny_bert, shapes, tmp_path, monkeypatch):
    from qformer.jobs.train_job import launch_training

    cfg = _cfg(tiny_bert, shapes, tmp_path, "local", {"max_steps_per_epoch": 3, "save_freq_steps": 2,
                                                      "valid_splits": ["val"], "keep_checkpoints": 5, **FP16_RUN,
                                                      "mlflow": {"system_metrics_s": 0.5}},
               model=FP16_MODEL)
    with pytest.raises(Exception, match="injected failure"):  # crashes after the step-2 checkpoint, mid-epoch 0
        launch_training(cfg, local_mode=True, step_hooks=[FailOnceAtStep(2, str(tmp_path / "failed_once"))])
    result = launch_training(cfg, local_mode=True)  # same name: picks up the step-2 checkpoint

    client = _client(cfg)
    runs = client.search_runs([client.get_experiment_by_name("test-train").experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]  # one training = one MLflow run
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["run.init_lr"] == "0.0001" and run.data.params["model.num_query_token"] == "4"
    assert run.data.tags["model_type"] == "blip2/tiny" and run.data.tags["datasets"] == "coco_caption"
    assert "git_commit" in run.data.tags and "last_checkpoint" in run.data.tags
    lr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    # epoch 0: warm-up by in-epoch step (0, 1/4, 2/4 of init_lr); epoch 1: per-epoch cosine, constant
    assert lr == pytest.approx({1: 0.0, 2: 2.5e-5, 3: 5e-5, 4: _cos(1, 2), 5: _cos(1, 2), 6: _cos(1, 2)})
    loss_steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert loss_steps == [1, 2, 3, 4, 5, 6]
    for key in ("loss_itc", "loss_itm", "loss_lm", "temp", "samples_per_s", "data_wait_frac", "skipped_images",
                "grad_norm", "cpu_rss_gb"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/r_mean")] == [0, 1]  # step = epoch
    # the world keys at each worker group's first trained step, the epoch when it changes (and at each worker
    # process's first logged step): the crash restarted it at step 3
    assert [m.step for m in client.get_metric_history(run.info.run_id, "world_size")] == [1, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [1, 3, 4]
    system = {k for k in run.data.metrics if k.startswith("system/")}  # MLflow's System metrics tab
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    artifacts = {a.path for d in ("config", "plots", "checkpoints/final")
                 for a in client.list_artifacts(run.info.run_id, d)}
    assert {"config/resolved.yaml", "plots/loss_curve.png", "checkpoints/final/checkpoint.pth"} <= artifacts

    from qformer.train.checkpoint import load_file

    state = load_file(result.checkpoint_path)  # weights_only=True
    assert {"model", "optimizer", "config", "scaler", "epoch", "scheduler", "step", "mlflow_run_id"} <= set(state)
    assert state["epoch"] == 1 and state["step"] == 6 and state["epoch_complete"]
    assert state["mlflow_run_id"] == result.mlflow_run_id
    assert state["scheduler"]["cur_epoch"] == 1 and state["config"]["run"]["init_lr"] == 1e-4
    # the tiny config's ViT is random (no weight file), so it travels with the checkpoint
    assert any(k.startswith("visual_encoder.") for k in state["model"])
    assert "query_tokens" in state["model"] and "ln_vision.weight" in state["model"]
    assert state["model"]["visual_encoder.blocks.0.mlp.fc1.weight"].dtype == torch.float16  # fp16 ViT on the CPU
    scale = _metric(client, run.info.run_id, "grad_scale")
    # exact until an overflow is possible: the step-3 scale continues the step-2 checkpoint's (a fresh
    # scaler would give 2^13 again)
    assert [scale[1], scale[2], scale[3]] == [2.0**13, 2.0**14, 2.0**15]
    assert state["scaler"]["scale"] == scale[6]

    # the same command again: reported finished and left alone (no step trained or logged, status kept)
    again = launch_training(cfg, local_mode=True)
    assert again.finished and again.mlflow_run_id == result.mlflow_run_id
    assert again.checkpoint_path == result.checkpoint_path
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")}) == [1, 2, 3, 4, 5, 6]
    # changed model or data settings stop before anything starts, listing the keys
    plain = OmegaConf.to_container(cfg, resolve=True)
    with pytest.raises(ConfigError, match=r"model.num_query_token \(4 -> 8\).*--allow-config-change"):
        launch_training(load_config_dict(plain, ["model.num_query_token=8"]), local_mode=True)
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    # training a finished run further (a raised max_epoch) opens a new MLflow run that points back
    longer = launch_training(load_config_dict(plain, ["run.max_epoch=3", "run.valid_splits=[]"]), local_mode=True)
    assert longer.error is None and longer.metrics["step"] == 9 and longer.mlflow_run_id != result.mlflow_run_id
    assert client.get_run(longer.mlflow_run_id).data.tags["qformer.continues_run"] == result.mlflow_run_id
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(longer.mlflow_run_id, "loss")}) == [7, 8, 9]
    # every later step doubles the scale or, on an overflow (counted, the step skipped), halves it; the
    # continued run picks the scale up from the final checkpoint
    scale.update(_metric(client, longer.mlflow_run_id, "grad_scale"))
    logged = {**_metric(client, run.info.run_id, "skipped_overflow"),
              **_metric(client, longer.mlflow_run_id, "skipped_overflow")}
    skipped = {n: logged[max(k for k in logged if k <= n)] for n in range(1, 10)}  # logged when it changes
    halved = [n for n in range(4, 10) if scale[n] == scale[n - 1] / 2]
    assert all(scale[n] in (scale[n - 1] / 2, 2 * scale[n - 1]) for n in range(4, 10)), scale
    assert halved, f"no overflow in 9 steps: {scale}"
    assert all(skipped[n] == skipped[n - 1] + (n in halved) for n in (4, 5, 6, 8, 9)), skipped  # per worker process


def test_iteration_based_runner_cycles_data_and_counts_inner_epochs(ray_cluster, tiny_bert, shapes, tmp_path):
    """runner_iter: max_iters / iters_per_inner_epoch inner epochs; the stream continues past a data pass."""
    from qformer.jobs.train_job import launch_training

    # 32 captions / batch 8 = 4 batches per pass; 2 inner epochs x 3 iterations cross the pass boundary
    cfg = _cfg(tiny_bert, shapes, tmp_path, "iters", {"batch_size_train": 8, "max_iters": 6, "iters_per_inner_epoch": 3,
                                           "runner": "runner_iter", "log_freq": 1})
    result = launch_training(cfg, local_mode=True)
    assert result.metrics["step"] == 6 and result.metrics["epoch"] == 1
    client = _client(cfg)
    lr = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "lr")}
    # inner epoch 0 warms up by in-epoch step; inner epoch 1 uses cosine with max_epoch = 6 / 3 = 2
    assert lr == pytest.approx({1: 0.0, 2: 2.5e-5, 3: 5e-5, 4: _cos(1, 2), 5: _cos(1, 2), 6: _cos(1, 2)})

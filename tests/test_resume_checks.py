"""What a launch continues from and whether it may (qformer.train.resume), on checkpoint directories
written by the real checkpoint code, without Ray."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qformer.config import ConfigError
from qformer.train import checkpoint as ckpt_io
from qformer.train.resume import check_config_unchanged, config_differences, find_prior, finished

CONFIG = {"model": {"arch": "blip2", "num_query_token": 4, "vit_kwargs": {"depth": 2}},
          "datasets": {"coco_caption": {"build_info": {"images": {"storage": "/data/coco"}}}},
          "run": {"init_lr": 1e-4}}


def _save(directory: Path, *, epoch: int, step: int, complete: bool = True, config: dict = CONFIG) -> Path:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = ckpt_io.build_state(model, opt, None, None, config, epoch=epoch, step=step, iters_in_epoch=0 if complete else 1,
                                epoch_complete=complete, mlflow_run_id=f"run-{step}")
    return ckpt_io.save_dir(state, directory)


def test_config_differences_names_each_changed_leaf() -> None:
    new = {"model": {"arch": "blip2", "num_query_token": 8, "vit_kwargs": {"depth": 2, "extra": 1}},
           "datasets": {"coco_caption": {"build_info": {"images": {"storage": "/data/other"}}}}}
    assert config_differences({k: CONFIG[k] for k in ("model", "datasets")}, new) == [
        "datasets.coco_caption.build_info.images.storage ('/data/coco' -> '/data/other')",
        "model.num_query_token (4 -> 8)", "model.vit_kwargs.extra (unset -> 1)"]


def test_latest_ray_checkpoint_wins_over_an_explicit_file_and_local_mode_prefers_the_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _save(run_dir / "epoch=0000-step=00000002", epoch=0, step=2, complete=False)
    _save(run_dir / "epoch=0000-step=00000004-end", epoch=0, step=4)
    (run_dir / "epoch=0001-broken").mkdir()
    (run_dir / "epoch=0001-broken" / ckpt_io.META_FILE).write_text("{not json")  # half written: ignored
    explicit = _save(tmp_path / "elsewhere", epoch=3, step=9)
    newest = _save(run_dir / "epoch=0001-step=00000006", epoch=1, step=6, complete=False)
    with open(newest / ckpt_io.CKPT_FILE, "r+b") as f:  # truncated by a crash or a full disk
        f.truncate(100)
    prior = find_prior(run_dir, str(explicit), local_mode=False)
    assert prior.path == run_dir / "epoch=0000-step=00000004-end" and prior.mlflow_run_id == "run-4"
    assert prior.passed_over == ("epoch=0001-step=00000006",)
    assert find_prior(tmp_path / "fresh", str(explicit / ckpt_io.CKPT_FILE), local_mode=False).path == explicit
    _save(run_dir / "local_checkpoints" / "a", epoch=0, step=3, complete=False)
    assert find_prior(run_dir, None, local_mode=True).path == run_dir / "local_checkpoints" / "a"
    assert find_prior(run_dir, str(explicit), local_mode=True).mlflow_run_id == "run-9"
    assert find_prior(tmp_path / "fresh", None, local_mode=False) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_prior(None, str(tmp_path / "nope.pth"), local_mode=False)


def test_changed_model_or_data_settings_stop_a_resume(tmp_path: Path) -> None:
    prior = find_prior(None, str(_save(tmp_path / "c", epoch=0, step=4)), local_mode=False)
    check_config_unchanged(prior, {**CONFIG, "run": {"init_lr": 3e-4}})  # run keys may change
    changed = {**CONFIG, "model": {**CONFIG["model"], "num_query_token": 8}}
    with pytest.raises(ConfigError, match=r"was written with other settings: model.num_query_token \(4 -> 8\)\. "
                                          r"Give a new run.output_dir .* --allow-config-change"):
        check_config_unchanged(prior, changed)
    # a LAVIS checkpoint ({"model": ...} and LAVIS's own config layout) is not compared
    torch.save({"model": {}, "config": {"model": {"arch": "blip2_qformer"}}}, tmp_path / "lavis.pth")
    check_config_unchanged(find_prior(None, str(tmp_path / "lavis.pth"), local_mode=False), changed)


@pytest.mark.parametrize("epoch, complete, run, done", [
    (1, True, {"max_epoch": 2}, True),            # the last epoch's end checkpoint
    (1, False, {"max_epoch": 2}, False),          # mid-way through the last epoch
    (1, True, {"max_epoch": 3}, False),           # the user raised max_epoch: more to train
    (0, True, {"max_epoch": 2}, False),
])
def test_finished_follows_the_configured_schedule(tmp_path: Path, epoch, complete, run, done) -> None:
    prior = find_prior(None, str(_save(tmp_path / "c", epoch=epoch, step=6, complete=complete)), local_mode=False)
    assert finished(prior, OmegaConf.create(run)) is done


def test_finished_for_iteration_based_runs(tmp_path: Path) -> None:
    run = OmegaConf.create({"max_iters": 6, "iters_per_inner_epoch": 3, "max_epoch": 1})
    assert finished(find_prior(None, str(_save(tmp_path / "a", epoch=1, step=6)), local_mode=False), run)
    assert not finished(find_prior(None, str(_save(tmp_path / "b", epoch=1, step=5, complete=False)),
                                   local_mode=False), run)

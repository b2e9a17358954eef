"""The schema's defaults behave as LAVIS stage-1 does where LAVIS decides, and the schema's own rules hold."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from qformer.config import load_config_dict, packaged
from qformer.config.schema import IGNORED, REQUIRED, SCHEMA
from qformer.core.errors import ConfigError

LAVIS_FILE = Path(__file__).resolve().parent / "data" / "lavis_pretrain_stage1.yaml"
# LAVIS's blip2_pretrain.yaml plus the defaults Blip2Qformer.from_config hard-codes (spec §3.1), written out
LAVIS_MODEL = packaged.DEFAULTS_DIR / "models" / "blip2" / "pretrain.yaml"
# which checkpoint files to load is each model type's own; a type that names none loads nothing
PER_MODEL_TYPE = {"arch", "pretrained", "vit_weights"}
# qformer's model keys that LAVIS lacks: their defaults must keep LAVIS HEAD's behaviour
# (ITC gathers without gradient, spec §8.1; HEAD's ITM negative sampling, §4.3; no extra ViT kwargs)
OURS_AS_LAVIS = {"model.vit_kwargs": {}, "model.itc_gather_with_grad": False, "model.itm_negatives": "head",
                 "model.qformer_grad_checkpoint": False}  # bert-base-uncased's gradient_checkpointing

# The fallbacks of LAVIS's train.py and runner_base (`run_cfg.get(key, fallback)`) for run keys a project
# file may leave out (spec §1.1, §1.4 "Not set (defaults apply)", §5.2; runner_base.py lr_scheduler).
LAVIS_RUN_FALLBACKS = {
    "runner": "runner_base", "warmup_lr": -1, "warmup_steps": 0, "lr_decay_rate": None, "accum_grad_iters": 1,
    "beta2": 0.999, "lr_layer_decay": 1, "log_freq": 50, "save_freq": 5, "save_last": True, "valid_splits": [],
    "test_splits": [], "resume_ckpt_path": None, "train_dataset_ratios": None,
}
# Run keys LAVIS documents (ConfigValidator) or its runner reads (spec §1.2): each is either used or ignored.
LAVIS_RUN_KEYS = {
    "runner", "train_dataset_ratios", "max_iters", "max_epoch", "iters_per_inner_epoch", "lr_sched", "task",
    "init_lr", "min_lr", "warmup_lr", "lr_decay_rate", "weight_decay", "batch_size_train", "batch_size_eval",
    "num_workers", "warmup_steps", "seed", "output_dir", "evaluate", "train_splits", "valid_splits", "test_splits",
    "accum_grad_iters", "device", "world_size", "dist_url", "distributed", "use_dist_eval_sampler", "max_len",
    "min_len", "num_beams", "num_ans_candidates", "inference_method", "k_test",
    "amp", "beta2", "lr_layer_decay", "log_freq", "save_freq", "val_freq", "save_last", "resume_ckpt_path",
}


def test_model_keys_nobody_sets_get_lavis_stage1_values():
    lavis = yaml.safe_load(LAVIS_MODEL.read_text())["model"]
    for key, value in lavis.items():
        if key not in PER_MODEL_TYPE:
            assert SCHEMA[f"model.{key}"].default == value, key
    ours = {k for k, spec in SCHEMA.items()
            if k.startswith("model.") and spec.default is not REQUIRED and k.split(".", 1)[1] not in lavis}
    assert ours == set(OURS_AS_LAVIS)  # a new model key must say how it keeps LAVIS's behaviour
    for key, value in OURS_AS_LAVIS.items():
        assert SCHEMA[key].default == value, key


def test_run_keys_a_lavis_file_leaves_out_take_lavis_runner_fallbacks():
    experiment = yaml.safe_load(LAVIS_FILE.read_text())
    for key in LAVIS_RUN_FALLBACKS:  # the stage-1 file sets warmup_lr and warmup_steps: drop them too
        experiment["run"].pop(key, None)
    cfg = load_config_dict(experiment)
    assert {k: OmegaConf.to_object(cfg.run[k]) if OmegaConf.is_config(cfg.run[k]) else cfg.run[k]
            for k in LAVIS_RUN_FALLBACKS} == LAVIS_RUN_FALLBACKS
    assert {name: cfg.datasets[name].type for name in experiment["datasets"]} == {
        "coco_caption": "default", "vg_caption": "default"}  # LAVIS: datasets.<name>.type defaults to "default"


def test_required_keys_and_ignored_keys():
    minimal = {"model": {"arch": "blip2", "model_type": "tiny"}}
    load_config_dict(minimal)  # nothing else is required: every other key has a default
    missing = {  # a config lacking each REQUIRED key
        "model.arch": {"model": {"model_type": "tiny"}},
        "model.model_type": {"model": {"arch": "blip2"}},
        # images.storage is not required: only annotation datasets need it (their builder checks)
        "datasets.*.build_info.annotations.*.storage":
            {**minimal, "datasets": {"coco_caption": {"build_info": {"annotations": {"extra": {"url": "u"}}}}}},
    }
    assert set(missing) == {k for k, spec in SCHEMA.items() if spec.default is REQUIRED}
    for key, experiment in missing.items():
        with pytest.raises(ConfigError) as err:
            load_config_dict(experiment)
        wanted = key.replace("datasets.*", "datasets.coco_caption").replace("annotations.*", "annotations.extra")
        assert err.value.key == wanted and "missing required value" in str(err.value)
    # every LAVIS run key loads: used (in SCHEMA) or ignored with a warning, never both, and nothing else ignored
    lavis = {f"run.{k}" for k in LAVIS_RUN_KEYS}
    assert lavis <= SCHEMA.keys() | IGNORED.keys() and not SCHEMA.keys() & IGNORED.keys()
    assert IGNORED.keys() <= lavis


def test_every_default_passes_its_own_rules():
    # Defaults are filled, not checked; give each one explicitly so the validator sees it.
    experiment: dict = {"model": {"arch": "blip2", "model_type": "tiny"}}
    given = {}
    for key, spec in SCHEMA.items():
        if "*" in key or spec.default is REQUIRED:
            continue
        *parents, leaf = key.split(".")
        node = experiment
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = spec.default
        if spec.kind != "map":  # a map merges with the layers below (tiny's vit_kwargs), a value replaces
            given[key] = spec.default
    experiment["model"].update(load_pretrained=False)  # tiny has no checkpoint to load
    given["model.load_pretrained"] = False
    cfg = load_config_dict(experiment)
    kept = {key: OmegaConf.select(cfg, key) for key in given}  # accepted as given, not replaced by a layer
    assert {k: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for k, v in kept.items()} == given

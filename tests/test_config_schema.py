"""The schema table matches the team contract: every documented key exists with its documented default."""
from __future__ import annotations

import pytest

from qformer.config import load_config_dict
from qformer.config.schema import IGNORED, REQUIRED, SCHEMA

# contract.md "Keys" (defaults in brackets there)
CONTRACT_DEFAULTS = {
    "model.load_pretrained": True, "model.load_finetuned": False, "model.pretrained": "", "model.finetuned": "",
    "model.vit_model": "eva_clip_g", "model.vit_kwargs": {}, "model.vit_weights": None, "model.image_size": 224,
    "model.drop_path_rate": 0, "model.use_grad_checkpoint": False, "model.vit_precision": "fp16",
    "model.freeze_vit": True, "model.num_query_token": 32, "model.bert_model": "bert-base-uncased",
    "model.cross_attention_freq": 2, "model.max_txt_len": 32, "model.embed_dim": 256,
    "model.itc_gather_with_grad": False, "model.itm_negatives": "head",
    "datasets.*.type": "default",
    "run.task": "image_text_pretrain", "run.runner": "runner_base", "run.lr_sched": "linear_warmup_cosine_lr",
    "run.init_lr": 1e-4, "run.min_lr": 1e-5, "run.warmup_lr": -1, "run.warmup_steps": 0, "run.lr_decay_rate": None,
    "run.weight_decay": 0.05, "run.max_epoch": 10, "run.max_iters": None, "run.iters_per_inner_epoch": None,
    "run.batch_size_train": 100, "run.batch_size_eval": 64, "run.seed": 42,
    "run.output_dir": "output/BLIP2/Pretrain_stage1", "run.amp": True, "run.resume_ckpt_path": None,
    "run.evaluate": False, "run.train_splits": ["train"], "run.valid_splits": [], "run.test_splits": [],
    "run.accum_grad_iters": 1, "run.beta2": 0.999, "run.lr_layer_decay": 1.0, "run.log_freq": 50,
    "run.save_freq": 5, "run.val_freq": 1, "run.save_last": True, "run.k_test": 128,
    "run.train_dataset_ratios": None, "run.data_root": None, "run.amp_dtype": "auto", "run.save_freq_steps": 0,
    "run.keep_checkpoints": 3, "run.best_metric": "r_mean", "run.skip_nonfinite": False, "run.vision_cache": None,
    "run.max_steps_per_epoch": None,
    "run.ray.num_workers": 1, "run.ray.use_gpu": "auto", "run.ray.resources_per_worker": None,
    "run.ray.storage_path": None, "run.ray.max_failures": 0, "run.ray.address": None, "run.ray.name": None,
    "run.mlflow.tracking_uri": None, "run.mlflow.experiment_name": "qformer-stage1", "run.mlflow.run_name": None,
    "run.mlflow.enabled": True,
    "run.data.concurrency": None, "run.data.batch_size": 32, "run.data.shuffle_buffer": 0,
    "run.data.prefetch_batches": 2, "run.data.num_cpus_per_task": 1.0,
}


@pytest.mark.parametrize("key", sorted(CONTRACT_DEFAULTS))
def test_contract_key_has_its_default(key):
    assert SCHEMA[key].default == CONTRACT_DEFAULTS[key]


def test_required_keys_and_ignored_keys():
    assert [k for k, spec in SCHEMA.items() if spec.default is REQUIRED] == [
        "model.arch", "model.model_type",
        "datasets.*.build_info.annotations.*.storage"]  # images.storage: only annotation datasets need it (builder)
    assert sorted(k.split(".")[1] for k in IGNORED) == sorted(
        ["device", "world_size", "dist_url", "distributed", "num_workers", "use_dist_eval_sampler", "max_len",
         "min_len", "num_beams", "num_ans_candidates", "inference_method"])


def test_every_default_passes_its_own_rules():
    # Defaults are filled, not checked; give each one explicitly so the validator sees it.
    experiment: dict = {"model": {"arch": "blip2", "model_type": "tiny"}}
    for key, spec in SCHEMA.items():
        if "*" in key or spec.default is REQUIRED:
            continue
        *parents, leaf = key.split(".")
        node = experiment
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = spec.default
    experiment["model"].update(load_pretrained=False)  # tiny has no checkpoint to load
    cfg = load_config_dict(experiment)
    assert cfg.run.ray.use_gpu == "auto" and cfg.model.vit_model == "eva_clip_g"

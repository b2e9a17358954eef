"""Every kind of config error: the message names the dotted key, the layer it came from, and a fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from qformer.config import ConfigError, load_config, load_config_dict


def minimal(**sections) -> dict:
    cfg = {"model": {"arch": "blip2", "model_type": "pretrain"}, "datasets": {"coco_caption": {}}, "run": {}}
    for name, values in sections.items():
        cfg[name].update(values)
    return cfg


def error_of(cfg=None, options=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config_dict(minimal() if cfg is None else cfg, options)
    err = info.value
    assert "\n" not in str(err)  # one line for the CLI
    return err


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


# ---- unknown keys ----------------------------------------------------------------------------------

def test_typo_in_file_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "model: {arch: blip2, model_type: pretrain}\nrun:\n  init_lrr: 1e-4\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    err = info.value
    assert err.key == "run.init_lrr" and err.suggestion == "run.init_lr"
    assert err.source == f"experiment: {path}"
    assert str(err) == f"run.init_lrr: unknown key (from experiment: {path}); did you mean run.init_lr?"


def test_typo_in_options_names_options():
    err = error_of(options=["run.ray.num_worker=2"])
    assert err.key == "run.ray.num_worker" and err.source == "--options"
    assert "did you mean run.ray.num_workers?" in str(err)


def test_key_in_the_wrong_section_suggests_the_right_one():
    err = error_of(minimal(run={"num_query_token": 8}))
    assert err.key == "run.num_query_token" and err.suggestion == "model.num_query_token"


def test_unknown_top_level_section():
    cfg = minimal()
    cfg["modle"] = {}
    err = error_of(cfg)
    assert err.key == "modle" and err.suggestion == "model" and err.source == "experiment: <dict>"


def test_unknown_key_inside_a_dataset_entry():
    err = error_of(options=["datasets.coco_caption.build_info.image.storage=x"])
    assert err.key == "datasets.coco_caption.build_info.image"
    assert err.suggestion == "datasets.coco_caption.build_info.images"


def test_unknown_dataset_builder_lists_known_names():
    err = error_of(minimal(datasets={"coco_captoin": {}}))
    assert err.key == "datasets.coco_captoin" and err.suggestion == "datasets.coco_caption"
    assert "coco_caption" in err.reason and "vg_caption" in err.reason


def test_unknown_dataset_type():
    err = error_of(options=["datasets.coco_caption.type=defualt"])
    assert err.key == "datasets.coco_caption.type" and err.source == "--options"
    assert err.suggestion == "default"


# ---- model selection ------------------------------------------------------------------------------

@pytest.mark.parametrize("drop", ["arch", "model_type"])
def test_missing_required_model_keys(drop):
    cfg = minimal()
    del cfg["model"][drop]
    err = error_of(cfg)
    assert err.key == f"model.{drop}" and "missing required value" in str(err)


def test_unknown_model_type_suggests_close_one():
    err = error_of(options=["model.model_type=pretrain_vitl"])
    assert err.key == "model.model_type" and err.source == "--options"
    assert err.suggestion == "pretrain_vitL" and "tiny" in err.reason


def test_unknown_arch(tmp_path):
    path = write(tmp_path, "model: {arch: blip3, model_type: pretrain}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "model.arch" and info.value.suggestion == "blip2"
    assert info.value.source == f"experiment: {path}"


def test_model_type_must_be_a_string():
    err = error_of(options=["model.model_type=3"])
    assert err.key == "model.model_type" and "expected a string" in str(err)


# ---- types ------------------------------------------------------------------------------------------

def test_string_for_a_float_is_rejected(tmp_path):
    path = write(tmp_path, "model: {arch: blip2, model_type: pretrain}\nrun: {init_lr: fast}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"run.init_lr: expected a number, got string 'fast' (from experiment: {path})"


def test_quoted_float_string_is_accepted(tmp_path):
    # YAML 1.1 readers give `1e-4` as text; the same text quoted must not be a type error.
    path = write(tmp_path, "model: {arch: blip2, model_type: pretrain}\nrun: {init_lr: '1e-4', min_lr: 1.0e-6}\n")
    cfg = load_config(path)
    assert cfg.run.init_lr == pytest.approx(1e-4) and cfg.run.min_lr == pytest.approx(1e-6)


@pytest.mark.parametrize("option, fragment", [
    ("run.seed=1.5", "expected an integer, got float 1.5"),
    ("run.amp=yes please", "expected true/false"),
    ("model.freeze_vit=1", "expected true/false, got int 1"),
    ("run.train_splits=train", "expected a list"),
    ("run.train_splits=[1,2]", "element 0 must be a string"),
    ("run.ray=4", "expected a section"),
    ("model.vit_kwargs=3", "expected a mapping"),
    ("run.init_lr=null", "must not be null"),
    ("run.ray.use_gpu=maybe", "must be one of auto, true, false"),
    ("run.data.concurrency=[4,2]", "[min, max]"),
])
def test_wrong_types_and_values_from_options(option, fragment):
    err = error_of(options=[option])
    assert err.key == option.split("=")[0] and err.source == "--options"
    assert fragment in str(err)


def test_choice_typo_gets_a_suggestion():
    err = error_of(options=["run.lr_sched=linear_warmup_cosine"])
    assert err.suggestion == "linear_warmup_cosine_lr" and "constant_lr" in str(err)


# ---- ranges -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, fragment", [
    ("run.init_lr=-1e-4", "must be > 0"),
    ("run.init_lr=0", "must be > 0"),
    ("model.num_query_token=0", "must be >= 1"),
    ("run.accum_grad_iters=0", "must be >= 1"),
    ("run.batch_size_train=0", "must be >= 1"),
    ("run.weight_decay=-0.1", "must be >= 0"),
    ("run.beta2=1.0", "must be < 1"),
    ("run.warmup_steps=-5", "must be >= 0"),
    ("run.ray.num_workers=-1", "must be >= 0"),
    ("model.drop_path_rate=1.0", "must be < 1"),
    ("run.warmup_lr=-0.5", "or -1"),
    ("run.init_lr=.inf", "must be a finite number"),
    ("run.weight_decay=.nan", "must be a finite number"),
])
def test_out_of_range_values(option, fragment):
    err = error_of(options=[option])
    assert err.key == option.split("=")[0] and fragment in str(err)


def test_warmup_lr_minus_one_means_init_lr():
    assert load_config_dict(minimal(), ["run.warmup_lr=-1"]).run.warmup_lr == -1.0


# ---- value rules ------------------------------------------------------------------------------------

def test_unknown_processor_name_suggests():
    err = error_of(options=["datasets.coco_caption.vis_processor.train={name: blip2_image_trian}"])
    assert err.key == "datasets.coco_caption.vis_processor.train"
    assert err.suggestion == "blip2_image_train"


def test_processor_without_name():
    err = error_of(options=["datasets.coco_caption.text_processor.eval={max_words: 30}"])
    assert err.key == "datasets.coco_caption.text_processor.eval" and "needs a 'name'" in str(err)


def test_vit_model_must_be_known_or_timm():
    err = error_of(options=["model.vit_model=eva_clip_h"])
    assert "timm:<model name>" in str(err)
    assert load_config_dict(minimal(), ["model.vit_model=timm:vit_small_patch16_224"]).model.vit_model


def test_train_dataset_ratios_must_name_configured_datasets():
    err = error_of(options=["run.train_dataset_ratios={coco_captio: 1.0}"])
    assert err.key == "run.train_dataset_ratios.coco_captio" and err.suggestion == "coco_caption"
    err = error_of(options=["run.train_dataset_ratios={coco_caption: 0}"])
    assert err.key == "run.train_dataset_ratios" and "positive" in str(err)


def test_runner_iter_needs_iteration_keys():
    err = error_of(options=["run.runner=runner_iter"])
    assert err.key == "run.max_iters"


def test_dataset_without_packaged_defaults_needs_image_storage(tmp_path):
    cfg = minimal()
    cfg["datasets"]["coco_caption"] = {"build_info": {"images": {"storage": None}}}
    err = error_of(cfg)
    assert err.key == "datasets.coco_caption.build_info.images.storage" and "must not be null" in str(err)


def test_missing_value_marker():
    err = error_of(minimal(run={"output_dir": "???"}))
    assert err.key == "run.output_dir" and "missing" in str(err)


# ---- files and --options syntax ---------------------------------------------------------------------

def test_missing_file():
    with pytest.raises(ConfigError, match="experiment file not found: nowhere.yaml"):
        load_config("nowhere.yaml")


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, "model:\n  arch: [blip2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == f"experiment: {path}" and "cannot read YAML" in str(info.value)


def test_file_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not a list"):
        load_config(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("tokens, fragment", [
    (["run.seed=1", "run.amp"], "'run.amp' is not key=value"),
    (["run.seed", "1", "run.amp"], "'run.amp' has no value"),
    (["run..seed=1"], "not a dotted key"),
    (["run.seed=1", "run.seed.x=2"], "also used as a section"),
])
def test_bad_options_syntax(tokens, fragment):
    err = error_of(options=tokens)
    assert err.source == "--options" and fragment in str(err)


def test_unresolvable_interpolation_names_the_key():
    err = error_of(minimal(run={"min_lr": "${run.nope}"}))
    assert "cannot resolve" in str(err)


def test_processor_kwargs_merge_over_the_default_processor():
    # a mapping without `name` in a higher layer merges into the lower layer's processor
    cfg = load_config_dict(minimal(), ["preprocess.text_processor.eval={max_words: 30}"])
    assert cfg.preprocess.text_processor.eval == {"name": "blip_caption", "max_words": 30}


def test_splits_must_exist_in_some_dataset():
    err = error_of(options=["run.valid_splits=[vall]"])
    assert err.key == "run.valid_splits" and err.suggestion == "val" and "no dataset has a 'vall' split" in str(err)
    assert list(load_config_dict(minimal(), ["run.valid_splits=[val]"]).run.valid_splits) == ["val"]


def test_processor_image_size_must_match_the_model():
    tiny = {"model": {"arch": "blip2", "model_type": "tiny"}, "datasets": {"coco_caption": {
        "vis_processor": {"train": {"name": "blip2_image_train", "image_size": 96}}}}, "run": {}}
    err = error_of(tiny)
    assert err.key == "datasets.coco_caption.vis_processor.train.image_size" and err.source == "experiment: <dict>"
    assert "image_size 96 differs from model.image_size 64" in str(err)
    # the model's preprocess section counts too, and only for the splits the run uses
    err = error_of(options=["run.test_splits=[test]", "preprocess.vis_processor.eval.image_size=96"])
    assert err.key == "preprocess.vis_processor.eval.image_size" and err.source == "--options"
    load_config_dict(minimal(), ["preprocess.vis_processor.eval.image_size=96"])  # no eval split: unused
    # a processor without image_size has its default (blip_image_eval: 384), which the check sees
    err = error_of(minimal(datasets={"coco_caption": {"vis_processor": {"eval": {"name": "blip_image_eval"}}}}),
                   ["run.valid_splits=[val]"])
    assert err.key == "datasets.coco_caption.vis_processor.eval.image_size" and "image_size 384" in str(err)


def test_load_pretrained_needs_a_checkpoint():
    cfg = {"model": {"arch": "blip2", "model_type": "tiny", "load_pretrained": True}}
    err = error_of(cfg)
    assert err.key == "model.pretrained" and "load_pretrained is true" in str(err)
    assert err.source == "experiment: <dict>"


def _defaults_dir(tmp_path: Path, model_yaml: str, dataset_yaml: str | None = None) -> Path:
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "t.yaml").write_text(model_yaml)
    if dataset_yaml is not None:
        (tmp_path / "datasets" / "d").mkdir(parents=True)
        (tmp_path / "datasets" / "d" / "default.yaml").write_text(dataset_yaml)
    return tmp_path


def test_typo_in_a_packaged_default_file_names_that_file(tmp_path, monkeypatch):
    from qformer.config import packaged

    monkeypatch.setattr(packaged, "DEFAULTS_DIR", _defaults_dir(tmp_path, "model: {num_query_tokens: 8}\n"))
    err = error_of({"model": {"arch": "m", "model_type": "t"}})
    assert err.key == "model.num_query_tokens" and err.suggestion == "model.num_query_token"
    assert err.source == f"model defaults: {tmp_path / 'models' / 'm' / 't.yaml'}"


def test_dataset_default_file_must_hold_only_its_dataset(tmp_path, monkeypatch):
    from qformer.config import packaged

    monkeypatch.setattr(packaged, "DEFAULTS_DIR", _defaults_dir(
        tmp_path, "model: {load_pretrained: false}\n", "datasets: {other: {data_type: images}}\n"))
    err = error_of({"model": {"arch": "m", "model_type": "t"}, "datasets": {"d": None}})
    assert "must hold only datasets.d" in str(err) and "datasets/d/default.yaml" in err.source


def test_a_trained_vit_must_be_fp32():
    """A trainable fp16 ViT fails its first GradScaler step on a GPU ("Attempting to unscale FP16 gradients")."""
    err = error_of(options=["model.freeze_vit=false"])  # the pretrain defaults: vit_precision fp16
    assert err.key == "model.vit_precision" and "model.freeze_vit is false" in str(err)
    load_config_dict(minimal(), ["model.freeze_vit=false", "model.vit_precision=fp32"])  # what it asks for

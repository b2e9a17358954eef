"""The paper recipes say what the paper says: the ViT-L stage-1 batch (2320) and the augmentation of each
source, with LAVIS's VG choice selectable by one option."""
from __future__ import annotations

from pathlib import Path

from qformer.config import load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "blip2"


def test_vitl_stage1_global_batch_is_the_papers_2320() -> None:
    cfg = load_config(str(EXPERIMENTS / "pretrain_stage1_vitL.yaml"))
    assert cfg.model.model_type == "pretrain_vitL"
    assert cfg.run.batch_size_train * cfg.run.ray.num_workers * cfg.run.accum_grad_iters == 2320


def test_paper_recipe_augments_every_source_with_crop_and_flip_and_lavis_vg_is_one_option() -> None:
    path = str(EXPERIMENTS / "pretrain_stage1_paper.yaml")
    cfg = load_config(path)
    assert {cfg.datasets[n].vis_processor.train.name for n in cfg.datasets} == {"blip2_image_train"}
    lavis = load_config(path, ["datasets.vg_caption.vis_processor.train.name=blip_image_train"])
    assert lavis.datasets.vg_caption.vis_processor.train.name == "blip_image_train"
    assert load_config(str(EXPERIMENTS / "pretrain_stage1_vitL.yaml")).datasets.vg_caption.vis_processor.train.name \
        == "blip_image_train"  # the LAVIS mirror keeps LAVIS's choice (its comment says why)


def test_paper_recipe_trains_the_web_sets_on_capfilt_output() -> None:
    """The paper trains web images on their top-2 CapFilt captions: the web sets read `qformer data capfilt`'s
    output folders (samples with a `captions` list); COCO and VG read LAVIS's human-caption annotations."""
    cfg = load_config(str(EXPERIMENTS / "pretrain_stage1_paper.yaml"))
    web = {n for n in cfg.datasets if n not in ("coco_caption", "vg_caption")}
    assert web == {"conceptual_caption_3m", "conceptual_caption_12m", "sbu_caption", "laion400m"}
    assert all("-capfilt/" in str(cfg.datasets[n].build_info.storage) for n in web)

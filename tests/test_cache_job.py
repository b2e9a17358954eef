"""The Ray Data cache job end to end on the session's Ray, and loss equality with the online ViT."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qformer.config import ConfigError, load_config_dict

pytestmark = pytest.mark.ray

VIEWS = 3


def _cfg_dict(root, bert: str, **run):
    return {"model": {"arch": "blip2", "model_type": "tiny", "bert_model": bert},
            "datasets": {"coco_caption": {"build_info": {
                "annotations": {"train": {"storage": f"{root}/annotations/coco_karpathy_train.json"}},
                "images": {"storage": f"{root}/images"}}}},
            "run": {"seed": 3, "data": {"batch_size": 4}, **run}}


@pytest.fixture(scope="module")
def cache(ray_cluster, tiny_bert, tmp_path_factory):
    """6 synthetic images (one made corrupt), 2 captions each, cached with VIEWS views."""
    from qformer.data.synth import write_synthetic
    from qformer.jobs.cache_features import cache_features

    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, n_train=6, n_val=1, n_test=1, image_size=80, captions_per_image=2)
    bad = root / "images" / "train" / "train_000005.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path_factory.mktemp("cache") / "c"
    manifest = cache_features(load_config_dict(_cfg_dict(root, tiny_bert)), out, views=VIEWS, batch_size=4)
    return root, out, manifest, str(bad)


def test_job_writes_index_records_and_manifest(cache, tiny_bert):
    from qformer.data.tokenizer import load_tokenizer
    from qformer.features import store

    root, out, manifest, bad = cache
    index = store.read_images_index(out)
    assert len(index) == 5 and bad not in index and manifest["skipped_images"] == [bad]
    assert manifest["views"] == VIEWS and manifest["n_images"] == 5
    assert manifest["sources"] == {"coco_caption": 10}          # 2 captions x 5 decodable images
    assert manifest["feature_shape"] == [65, 192]                # tiny ViT: 8x8 patches + CLS, width 192
    reader = store.ShardReader(out)
    for shard, row in index.values():
        arr = reader.shard(shard)
        assert arr.dtype == np.float16 and arr.shape[1:] == (VIEWS, 65, 192) and row < arr.shape[0]
    records = store.read_records(out, "coco_caption")
    ids = store.fixed_list_to_numpy(records["text_ids"])
    assert ids.shape == (10, 32) and (ids[:, 0] == load_tokenizer(tiny_bert).cls_token_id).all()  # [CLS] first, padded


def test_reader_streams_features_and_tokens(cache, tiny_bert):
    from qformer.features import dataset

    root, out, manifest, _ = cache
    cfg = load_config_dict(_cfg_dict(root, tiny_bert, vision_cache=str(out)))
    data = dataset(cfg)
    assert list(data.datasets) == ["train"] and data.ratios is None and data.num_rows == {"train": 10}
    rows = data.datasets["train"].take_batch(10, batch_format="numpy")
    assert rows["image_embeds"].shape == (10, 65, 192) and rows["image_embeds"].dtype == np.float16
    assert rows["text_ids"].shape == (10, 32) and rows["text_ids"].dtype == np.int64
    assert set(rows) == {"image_embeds", "text_ids", "text_atts", "unit", "unit_row", "unit_rows"}  # + the stream position


def test_reader_refuses_a_cache_made_by_another_vit(cache, tiny_bert):
    from qformer.features import dataset

    root, out, _, _ = cache
    cfg = load_config_dict(_cfg_dict(root, tiny_bert, vision_cache=str(out)), ["model.vit_kwargs.depth=2"])
    with pytest.raises(ConfigError, match=r"run\.vision_cache.*model\.vit_kwargs"):
        dataset(cfg)
    with pytest.raises(ConfigError, match=r"run\.vision_cache.*does not exist"):
        dataset(load_config_dict(_cfg_dict(root, tiny_bert, vision_cache=str(out / "nope"))))


def test_check_model_accepts_the_seeded_vit_and_refuses_another(cache, tiny_bert):
    from qformer.features import check_model
    from qformer.models import build_model
    from qformer.core.seeding import setup_seeds

    root, out, _, _ = cache
    cfg = load_config_dict(_cfg_dict(root, tiny_bert, vision_cache=str(out)))
    setup_seeds(int(cfg.run.seed), 0)
    check_model(build_model(cfg.model), cfg)
    setup_seeds(int(cfg.run.seed) + 1, 0)  # another random ViT
    with pytest.raises(ConfigError, match=r"run\.vision_cache.*ViT weights differ"):
        check_model(build_model(cfg.model), cfg)


def _loss(model, samples) -> float:
    torch.manual_seed(0)  # same ITM negatives on both paths
    with torch.no_grad():
        return float(model(samples).loss)


def test_loss_with_cached_features_equals_online_vit_on_the_same_view(cache, tiny_bert):
    from qformer.data.builders import build_builder
    from qformer.data.images import load_rgb
    from qformer.data.normalize import normalize_uint8
    from qformer.data.tokenizer import tokenize
    from qformer.features import store
    from qformer.features.encoder import vit_fingerprint
    from qformer.features.views import ViewMaker
    from qformer.models import build_model
    from qformer.core.seeding import setup_seeds

    root, out, manifest, _ = cache
    cfg = load_config_dict(_cfg_dict(root, tiny_bert))
    setup_seeds(int(cfg.run.seed), 0)  # as training's rank 0 (random-init tiny ViT)
    model = build_model(cfg.model).eval()  # dropout off
    assert vit_fingerprint(model.visual_encoder) == manifest["vit_fingerprint"]

    builder = build_builder(cfg, "coco_caption")
    maker = ViewMaker(builder.processor("vis_processor", "eval"), builder.processor("vis_processor", "train"),
                      VIEWS, manifest["seed"])
    index = store.read_images_index(out)
    paths = sorted(index)[:4]
    order = {p: i for i, p in enumerate(dict.fromkeys(p for p, _ in builder.train_samples()))}  # job's image index
    captions = {p: c for p, c in builder.train_samples()}
    ids, atts = tokenize(str(cfg.model.bert_model), [captions[p] for p in paths], 32)
    text = {"text_ids": torch.from_numpy(ids), "text_atts": torch.from_numpy(atts)}
    reader = store.ShardReader(out)
    for view in (0, 2):  # the eval view, and a seeded train view regenerated here
        pixels = normalize_uint8(torch.from_numpy(np.stack([maker(load_rgb(p), order[p])[view] for p in paths])))
        online = _loss(model, {"image": pixels, **text})
        feats = reader.gather(np.array([index[p][0] for p in paths]), np.array([index[p][1] for p in paths]),
                              np.full(len(paths), view))
        cached_embeds = torch.from_numpy(feats).float()
        cached = _loss(model, {"image_embeds": cached_embeds, **text})
        assert cached == pytest.approx(online, rel=2e-3, abs=2e-3), f"view {view}"
        # the ViT features the Q-Former reads: the online ViT's, up to the cache's fp16 rounding
        with torch.no_grad():
            online_vit = model.vit_features(pixels)
        tolerance = 2e-3 * float(online_vit.abs().max())
        assert float((cached_embeds - online_vit).abs().max()) < tolerance, f"view {view}"
    # the check has teeth: another view's features are far from these
    other = reader.gather(np.array([index[p][0] for p in paths]), np.array([index[p][1] for p in paths]),
                          np.full(len(paths), 1))
    assert float((torch.from_numpy(other).float() - online_vit).abs().max()) > 20 * tolerance


def test_training_streams_cached_features_end_to_end(cache, tiny_bert, tmp_path):
    """`run.vision_cache` through the same launcher as `qformer train`: the workers get image_embeds
    rows (no image decoding), the ViT guard passes, and the run logs finite losses to MLflow. In fp16 with a
    GradScaler, as on a GPU (the cached features are fp16), and resumed after a crash: the loss scale (from
    2^12, doubling after each good step) continues from the checkpoint."""
    from mlflow.tracking import MlflowClient

    from qformer.jobs.train_job import launch_training
    from step_hooks import FailOnceAtStep

    root, out, _, _ = cache
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config_dict(_cfg_dict(
        root, tiny_bert, vision_cache=str(out), batch_size_train=4, max_epoch=1, log_freq=1, save_freq_steps=1,
        amp=True, amp_dtype="fp16", amp_init_scale=2.0**12, amp_growth_interval=1,
        output_dir=str(tmp_path / "run"), valid_splits=[], test_splits=[],
        ray={"num_workers": 0}, mlflow={"tracking_uri": uri, "experiment_name": "cache-train"}))
    with pytest.raises(Exception, match="injected failure"):  # after the step-1 checkpoint
        launch_training(cfg, step_hooks=[FailOnceAtStep(1, str(tmp_path / "failed_once"))])
    result = launch_training(cfg)
    assert result.error is None
    client = MlflowClient(uri)
    history = client.get_metric_history(result.mlflow_run_id, "loss")
    assert [m.step for m in history] == [1, 2]                   # 10 cached captions // batch 4, drop_last
    assert all(math.isfinite(m.value) and m.value > 0 for m in history)
    scale = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "grad_scale")}
    assert scale == {1: 2.0**13, 2: 2.0**14}  # a fresh scaler after the restart would give 2^13 at step 2

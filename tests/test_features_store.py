"""Feature-cache format: shards, index, records and manifest round trips; views; the mismatch error."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from qformer.config import ConfigError, load_config_dict
from qformer.features import store
from qformer.features.manifest import build_manifest, check_compatible, read_manifest, write_manifest
from qformer.features.views import ViewMaker, train_view_for
from qformer.data.processors import Blip2ImageTrainProcessor, BlipImageEvalProcessor


def _cfg(**model):
    d = {"model": {"arch": "blip2", "model_type": "tiny", **model},
         "datasets": {"coco_caption": {"build_info": {"annotations": {"train": {"storage": "x.json"}},
                                                       "images": {"storage": "imgs"}}}}}
    return load_config_dict(d)


def test_shard_write_is_atomic_and_gather_picks_row_and_view(tmp_path):
    feats = np.random.default_rng(0).normal(size=(3, 2, 5, 4)).astype(np.float32)
    name = store.write_shard(tmp_path, feats, first_index=7)
    assert name.startswith("part-000000007-") and name.endswith(".npy")
    assert [p.name for p in (tmp_path / store.SHARDS_DIR).iterdir()] == [name]  # no .tmp left behind
    reader = store.ShardReader(tmp_path)
    out = reader.gather(np.array([name, name]), np.array([2, 0]), np.array([1, 0]))
    assert out.dtype == np.float16 and out.shape == (2, 5, 4)
    np.testing.assert_array_equal(out[0], feats[2, 1].astype(np.float16))
    np.testing.assert_array_equal(out[1], feats[0, 0].astype(np.float16))
    with pytest.raises(FileNotFoundError, match="part-missing"):
        reader.shard("part-missing.npy")
    with pytest.raises(ValueError, match="views, N, D"):
        store.write_shard(tmp_path, feats[0], 0)


def test_index_and_records_round_trip(tmp_path):
    store.write_images_index(tmp_path, ["a.jpg", "b.jpg"], ["s1.npy", "s2.npy"], [0, 3])
    assert store.read_images_index(tmp_path) == {"a.jpg": ("s1.npy", 0), "b.jpg": ("s2.npy", 3)}
    ids = np.array([[101, 7, 102, 0], [101, 8, 9, 102]], dtype=np.int64)
    atts = (ids > 0).astype(np.int64)
    store.write_records(tmp_path, "coco_caption", ["s1.npy", "s2.npy"], [0, 3], ids, atts)
    table = store.read_records(tmp_path, "coco_caption")
    np.testing.assert_array_equal(store.fixed_list_to_numpy(table["text_ids"]), ids)
    np.testing.assert_array_equal(store.fixed_list_to_numpy(table["text_atts"]), atts)
    assert table["row"].to_pylist() == [0, 3]
    with pytest.raises(FileNotFoundError, match="vg_caption"):
        store.read_records(tmp_path, "vg_caption")


def test_manifest_round_trip_and_compatible_config_passes(tmp_path):
    cfg = _cfg()
    manifest = build_manifest(cfg, views=3, seed=5, sources={"coco_caption": 10}, n_images=4,
                              feature_shape=(65, 192), skipped=["bad.jpg"])
    write_manifest(tmp_path, manifest)
    back = read_manifest(tmp_path)
    assert back == json.loads(json.dumps(manifest))
    assert back["settings"]["model.vit_model"] == "timm:vit_tiny_patch16_224"
    assert back["settings"]["model.vit_kwargs"] == {"depth": 4, "img_size": 64, "patch_size": 8}
    assert back["settings"]["datasets.coco_caption.vis_processor.train"]["name"] == "blip2_image_train"
    check_compatible(back, _cfg(), tmp_path)  # same settings: no error


def test_mismatching_vit_is_refused_naming_run_vision_cache_and_keys(tmp_path):
    write_manifest(tmp_path, build_manifest(_cfg(), 1, 0, {"coco_caption": 1}, 1, (65, 192), []))
    other = _cfg(vit_model="timm:vit_small_patch16_224", vit_kwargs={"img_size": 64, "patch_size": 8, "depth": 2})
    with pytest.raises(ConfigError) as err:
        check_compatible(read_manifest(tmp_path), other, tmp_path)
    msg = str(err.value)
    assert "run.vision_cache" in msg and "model.vit_model" in msg and "model.vit_kwargs" in msg
    assert "vit_small_patch16_224" in msg and "model.image_size" not in msg


def test_not_a_cache_and_wrong_version_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="run.vision_cache.*not a feature cache"):
        read_manifest(tmp_path)
    (tmp_path / store.MANIFEST).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ConfigError, match="run.vision_cache.*format_version"):
        read_manifest(tmp_path)


def test_view_maker_view0_is_eval_and_train_views_are_seeded():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    maker = ViewMaker(BlipImageEvalProcessor(32), Blip2ImageTrainProcessor(32), views=4, seed=9)
    views = maker(img, image_index=3)
    assert views.shape == (4, 3, 32, 32) and views.dtype == np.uint8
    np.testing.assert_array_equal(views[0], BlipImageEvalProcessor(32)(img))
    np.testing.assert_array_equal(views, maker(img, image_index=3))            # reproducible
    assert not np.array_equal(views[1], views[2])                               # views differ
    assert not np.array_equal(views[1], maker(img, image_index=4)[1])           # images differ
    with pytest.raises(ValueError, match="train image transform"):
        ViewMaker(BlipImageEvalProcessor(32), None, views=2, seed=0)


def test_train_view_for_epoch_is_a_train_view_and_deterministic():
    picks = [train_view_for(e, views=5, seed=1) for e in range(20)]
    assert set(picks) <= {1, 2, 3, 4} and len(set(picks)) > 1
    assert picks == [train_view_for(e, views=5, seed=1) for e in range(20)]
    assert train_view_for(3, views=1) == 0

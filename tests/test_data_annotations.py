"""Annotation files (LAVIS JSON, official COCO, JSONL), their errors, and the two builders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import data_config
from qformer.config import ConfigError
from qformer.data.annotations import coco_eval_image_id, read_caption_file, resolve_image_path
from qformer.data.builders import CaptionBuilder, build_builder
from qformer.core.errors import AnnotationError
from qformer.data.pipeline import build_eval_split
from qformer.data.processors.text import pre_caption
from qformer.data.synth import coco_caption_section
from qformer.core.registry import register_builder


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_karpathy_train_and_val(tmp_path: Path) -> None:
    train = read_caption_file(_write(tmp_path / "t.json", [
        {"image": "train2014/COCO_train2014_000000000009.jpg", "caption": "A plate.", "image_id": "coco_9"},
        {"image": "train2014/COCO_train2014_000000000009.jpg", "caption": "Food!", "image_id": "coco_9"},
    ]))
    assert [r.captions for r in train] == [("A plate.",), ("Food!",)]
    assert train[0].image_id == "coco_9" and train[1].index == 1
    val = read_caption_file(_write(tmp_path / "v.json", [{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["a", "b"]}]))
    assert val[0].captions == ("a", "b") and val[0].image_id is None


def test_official_coco_captions_format(tmp_path: Path) -> None:
    recs = read_caption_file(_write(tmp_path / "captions_val2017.json", {
        "info": {}, "images": [{"id": 139, "file_name": "000000000139.jpg"}, {"id": 285, "file_name": "000000000285.jpg"}],
        "annotations": [{"image_id": 285, "id": 1, "caption": "A bear."}, {"image_id": 139, "id": 2, "caption": "A room."}],
    }))
    assert [(r.image, r.captions, r.image_id) for r in recs] == [
        ("000000000285.jpg", ("A bear.",), "coco_285"), ("000000000139.jpg", ("A room.",), "coco_139")]
    with pytest.raises(AnnotationError, match=r"c.json, record 0: 'annotations' entry has no 'image_id'"):
        read_caption_file(_write(tmp_path / "c.json", {"images": [], "annotations": [{"image_id": 1, "caption": "x"}]}))


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "x"}\n\n{"image": "b.jpg", "caption": "y"}\n')
    assert [r.image for r in read_caption_file(path)] == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize("content, message", [
    ('[{"image": "a.jpg", "caption": "x"},', r"bad.json: malformed JSON at line 1 column \d+"),
    ("[]", r"bad.json: no records"),
    ('{"foo": 1}', r"bad.json: expected a JSON list of records or a COCO captions file"),
    ('"just a string"', r"bad.json: expected a JSON list of records, got str"),
    ('[{"image": "a.jpg", "caption": "x"}, {"caption": "y"}]', r"bad.json, record 1: record has no 'image'"),
    ('[{"image": "a.jpg"}]', r"bad.json, record 0: record has no 'caption'"),
    ('[{"image": "a.jpg", "caption": 5}]', r"bad.json, record 0: 'caption' must be a string or a list of strings, got int"),
    ('[{"image": "a.jpg", "caption": null}]', r"record 0: 'caption' must be a string or a list of strings, got NoneType"),
    ('[{"image": "a.jpg", "caption": ["ok", 3]}]', r"record 0: 'caption' must be a string or a list of strings, got list"),
    ('[{"image": "a.jpg", "caption": []}]', r"record 0: 'caption' is an empty list"),
    ('[{"image": "", "caption": "x"}]', r"record 0: 'image' must be a non-empty string"),
    ('[{"image": 7, "caption": "x"}]', r"record 0: 'image' must be a non-empty string"),
    ('[["a.jpg", "x"]]', r"record 0: record must be a JSON object, got list"),
    # a lone surrogate parses as JSON but no tokenizer or Arrow column takes it
    ('[{"image": "a.jpg", "caption": "ok"}, {"image": "b.jpg", "caption": "bad \\ud800"}]',
     r"bad.json, record 1: 'caption' holds text that is not valid Unicode \(surrogates not allowed"),
    ('[{"image": "a.jpg", "caption": ["ok", "x\\udfff"]}]', r"record 0: 'caption' holds text that is not valid Unicode"),
    ('[{"image": "\\ud800.jpg", "caption": "x"}]', r"record 0: 'image' holds text that is not valid Unicode"),
])
def test_malformed_annotations_name_file_and_record(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(AnnotationError, match=message):
        read_caption_file(_write(tmp_path / "bad.json", content))


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="nofile.json: annotation file not found"):
        read_caption_file(tmp_path / "nofile.json")
    (tmp_path / "latin.json").write_bytes(b'[{"image": "a.jpg", "caption": "caf\xe9"}]')
    with pytest.raises(AnnotationError, match="latin.json: not UTF-8"):
        read_caption_file(tmp_path / "latin.json")


def test_empty_and_long_captions_are_valid_records(tmp_path: Path) -> None:
    recs = read_caption_file(_write(tmp_path / "a.json", [{"image": "a.jpg", "caption": ""}, {"image": "b.jpg", "caption": "w " * 5000}]))
    assert recs[0].captions == ("",) and len(recs[1].captions[0]) == 10000


def test_image_path_rules(tmp_path: Path) -> None:
    root = tmp_path / "vg" / "images"
    assert resolve_image_path("VG_100K/1.jpg", root) == str(root / "VG_100K/1.jpg")
    assert resolve_image_path("/export/share/datasets/vision/visual-genome/image/2345.jpg", root) == str(root / "2345.jpg")
    assert resolve_image_path("/data/mine/3.jpg", root) == "/data/mine/3.jpg"


def test_coco_eval_image_id_quirk() -> None:
    assert coco_eval_image_id("val2014/COCO_val2014_000000391895.jpg") == "000000391895"
    assert coco_eval_image_id("val/val_000012.jpg") == "000012"
    assert coco_eval_image_id("giraffe.jpg") == "iraffe"  # LAVIS strips the *characters* .jpg


def _cfg(datasets: dict, **run) -> object:
    return data_config(datasets, **run)


def test_coco_builder_resolves_relative_paths_against_data_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "coco" / "annotations").mkdir(parents=True)
    _write(root / "coco/annotations/coco_karpathy_train.json", [{"image": "train2014/x.jpg", "caption": "A cat.", "image_id": "coco_1"}])
    cfg = _cfg({"coco_caption": {}}, data_root=str(root))
    builder = build_builder(cfg, "coco_caption")
    assert builder.splits() == ["train", "val", "test"]
    assert builder.train_samples("train") == [(str(root / "coco/images/train2014/x.jpg"), "A cat.")]


def test_vg_builder_reroots_lavis_absolute_paths(tmp_path: Path) -> None:
    ann = _write(tmp_path / "vg_caption.json", [
        {"image": "/export/share/datasets/vision/visual-genome/image/10.jpg", "caption": "a tree", "image_id": "vg_10", "dataset": "vg"}])
    cfg = _cfg({"vg_caption": {"build_info": {"annotations": {"train": {"storage": str(ann)}}, "images": {"storage": str(tmp_path / "img")}}}})
    builder = build_builder(cfg, "vg_caption")
    assert builder.splits() == ["train"]
    assert builder.train_samples() == [(str(tmp_path / "img" / "10.jpg"), "a tree")]
    with pytest.raises(ConfigError, match="datasets.vg_caption: builder 'vg_caption' has no evaluation splits"):
        builder.retrieval_split("val")


def test_retrieval_split_structures(synth_data: Path) -> None:
    split = build_eval_split(_cfg(coco_caption_section(synth_data)), "val")
    assert len(split) == 16 and len(split.texts) == 80 and split.image_size == 64
    assert split.img2txt[3] == [15, 16, 17, 18, 19] and split.txt2img[15] == 3
    assert all(split.txt2img[t] == i for i, ts in enumerate(split.img2txt) for t in ts)
    assert split.image_ids[3] == "000003"
    raw = json.loads((synth_data / "annotations/coco_karpathy_val.json").read_text())
    assert split.texts[:5] == [pre_caption(c) for c in raw[0]["caption"]]
    assert all(t == t.lower() and "." not in t and "!" not in t for t in split.texts)
    idx, imgs = next(split.images(batch_size=5))
    assert idx.tolist() == [0, 1, 2, 3, 4] and imgs.shape == (5, 3, 64, 64)


def test_processor_size_must_match_model(synth_data: Path) -> None:
    ds = coco_caption_section(synth_data)
    ds["coco_caption"]["vis_processor"] = {"train": {"name": "blip2_image_train", "image_size": 224}}
    with pytest.raises(ConfigError, match=r"datasets.coco_caption.vis_processor.train.image_size: image_size 224 differs from model.image_size 64"):
        build_builder(_cfg(ds), "coco_caption").processor("vis_processor", "train")


def test_eval_split_errors(synth_data: Path, tmp_path: Path) -> None:
    ann = _write(tmp_path / "vg.json", [{"image": "a.jpg", "caption": "x"}])
    ds = {**coco_caption_section(synth_data),
          "vg_caption": {"build_info": {"annotations": {"train": {"storage": str(ann)}}, "images": {"storage": str(tmp_path)}}}}
    assert len(build_eval_split(_cfg(ds), "test")) == 16  # only coco has test
    with pytest.raises(ConfigError, match="no dataset has a 'minival' split"):
        build_eval_split(_cfg(ds), "minival")


@register_builder("user_caps")
class UserCaps(CaptionBuilder):
    """A user-registered builder (how users add their own data sets)."""


def test_user_builder_and_ambiguous_eval_split(synth_data: Path) -> None:
    ds = {**coco_caption_section(synth_data), "user_caps": coco_caption_section(synth_data)["coco_caption"]}
    cfg = _cfg(ds)
    assert len(build_builder(cfg, "user_caps").train_samples()) == 240
    with pytest.raises(ConfigError, match="split 'val' is in several datasets"):
        build_eval_split(cfg, "val")


def test_official_coco_val_file_as_retrieval_split(tmp_path: Path) -> None:
    """Per-caption records are grouped per image for retrieval (one entry per image, all its captions)."""
    ann = _write(tmp_path / "captions_val2017.json", {
        "images": [{"id": 139, "file_name": "000000000139.jpg"}, {"id": 285, "file_name": "000000000285.jpg"}],
        "annotations": [{"image_id": 285, "id": 1, "caption": "A bear."}, {"image_id": 139, "id": 2, "caption": "A room!"},
                        {"image_id": 285, "id": 3, "caption": "Big brown bear"}]})
    ds = {"coco_caption": {"build_info": {"annotations": {"val": {"storage": str(ann)}},
                                          "images": {"storage": str(tmp_path / "val2017")}}}}
    split = build_builder(_cfg(ds), "coco_caption").retrieval_split("val")
    assert split.image_paths == [str(tmp_path / "val2017/000000000285.jpg"), str(tmp_path / "val2017/000000000139.jpg")]
    assert split.texts == ["a bear", "big brown bear", "a room"]
    assert split.img2txt == [[0, 1], [2]] and split.txt2img == [0, 0, 1]
    assert split.image_ids == ["000000000285", "000000000139"]

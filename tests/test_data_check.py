"""`qformer data check`: per-split report of records, images, undecodable files and caption stats."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from qformer.cli import main


def _experiment(tmp: Path, synth: Path, vg_text: str) -> Path:
    anns = synth / "annotations"
    coco_train = json.loads((anns / "coco_karpathy_train.json").read_text())[:20]
    coco_train += [{"image": "train/missing.jpg", "caption": "gone"},
                   {"image": str(tmp / "zero.jpg"), "caption": "Empty file!"},
                   {"image": "train/train_000000.jpg", "caption": "..."},
                   {"image": "train/train_000000.jpg", "caption": " ".join(["word"] * 60)}]
    (tmp / "zero.jpg").write_bytes(b"")
    (tmp / "train.json").write_text(json.dumps(coco_train))
    (tmp / "vg.json").write_text(vg_text)
    cfg = {
        "model": {"arch": "blip2", "model_type": "tiny"},
        "datasets": {
            "coco_caption": {"build_info": {"annotations": {
                "train": {"storage": str(tmp / "train.json")},
                "val": {"storage": str(anns / "coco_karpathy_val.json")},
                "test": {"storage": str(anns / "coco_karpathy_test.json")}},
                "images": {"storage": str(synth / "images")}}},
            "vg_caption": {"build_info": {"annotations": {"train": {"storage": str(tmp / "vg.json")}},
                                          "images": {"storage": str(synth / "images")}}},
        },
    }
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_check_reports_everything(tmp_path: Path, synth_data: Path, capsys) -> None:
    exp = _experiment(tmp_path, synth_data, '[{"image": "train/train_000001.jpg", "caption": "x"}, {"image": "y.jpg"}]')
    assert main(["data", "check", "--cfg-path", str(exp)]) == 1  # a bad annotation file fails the check
    out = capsys.readouterr().out
    assert f"ERROR {tmp_path / 'vg.json'}, record 1: record has no 'caption'" in out
    train = out.split("coco_caption/train:")[1].split("coco_caption/val:")[0]
    assert "records 24  captions 24  images 6  undecodable 2" in train
    assert "train/missing.jpg: file not found" in train and "zero.jpg: empty file" in train
    assert "empty 1  over-50-words 1" in train and "/60" in train  # max words 60
    assert "coco_caption/val:" in out and "records 16  captions 80  images 16  undecodable 0" in out
    assert "summary: 4 splits, 1 bad annotation files, 2 undecodable images" in out


def test_check_ok_and_annotations_only(tmp_path: Path, synth_data: Path, capsys) -> None:
    exp = _experiment(tmp_path, synth_data, '[{"image": "train/train_000001.jpg", "caption": "x"}]')
    assert main(["data", "check", "--cfg-path", str(exp), "--no-images"]) == 0
    assert "summary: 4 splits, 0 bad annotation files, 0 undecodable images" in capsys.readouterr().out


def test_bad_images_fail_the_check_unless_report_only(tmp_path: Path, synth_data: Path, capsys) -> None:
    exp = _experiment(tmp_path, synth_data, '[{"image": "train/train_000001.jpg", "caption": "x"}]')
    assert main(["data", "check", "--cfg-path", str(exp)]) == 1  # 2 undecodable images in coco train
    assert "summary: 4 splits, 0 bad annotation files, 2 undecodable images" in capsys.readouterr().out
    assert main(["data", "check", "--cfg-path", str(exp), "--report-only"]) == 0


def test_missing_image_folder_is_one_line_and_fails(tmp_path: Path, synth_data: Path, capsys, caplog) -> None:
    exp = _experiment(tmp_path, synth_data, '[{"image": "train/train_000001.jpg", "caption": "x"}]')
    gone = tmp_path / "no_such_images"
    options = ["--options", f"datasets.coco_caption.build_info.images.storage={gone}"]
    assert main(["data", "check", "--cfg-path", str(exp), *options]) == 1
    out = capsys.readouterr().out
    error = f"ERROR image directory {gone} does not exist (datasets.coco_caption.build_info.images.storage)"
    assert out.count(error) == 3  # train, val, test: one line each, no per-image "not found" list
    assert "bad image" not in out.split("vg_caption/train:")[0]
    assert "1 missing image folders" in out and "image directory" not in caplog.text  # no repeated warning
    assert main(["data", "check", "--cfg-path", str(exp), *options, "--report-only"]) == 0

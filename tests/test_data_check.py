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


def _shard_experiment(tmp: Path, storage: str, fmt: str | None = None) -> Path:
    info = {"storage": storage, **({"format": fmt} if fmt else {})}
    cfg = {"model": {"arch": "blip2", "model_type": "tiny", "image_size": 64},
           "datasets": {"web": {"builder": "image_text_shards", "build_info": info,
                                "vis_processor": {"train": {"name": "blip2_image_train", "image_size": 64}}}}}
    path = tmp / "shards.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_check_reads_shards_instead_of_trusting_their_metadata(tmp_path: Path, capsys) -> None:
    """img2dataset's stats say 10 per shard; one tar is cut, one is garbage, one uses upper-case extensions."""
    import io
    import tarfile

    from qformer.data.synth_shards import write_shards

    info = write_shards(tmp_path, "wds", shards=4, per_shard=10, seed=1, image_size=16)
    folder = Path(info["folder"])
    whole = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(whole[: len(whole) * 6 // 10])  # cut inside a later sample
    (folder / "00002.tar").write_bytes(b"\x13" * 20480)  # not a tar at all
    with tarfile.open(folder / "00000.tar") as tar:
        members = [(m.name.replace(".jpg", ".JPG"), tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for name, data in members:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    exp = _shard_experiment(tmp_path, info["storage"])
    assert main(["data", "check", "--cfg-path", str(exp)]) == 1  # damaged shards fail the check
    out = capsys.readouterr().out
    assert "wds shards 4  missing 0  verified 4 of 4 (all)" in out
    readable = int(out.split("samples ")[1].split(" readable")[0])
    assert 20 < readable < 30  # 10 + 10 + the cut tar's samples before the cut
    assert f"samples {readable} readable, {40 - readable} lost (damaged_shard {40 - readable}); metadata says 40" in out
    damaged = [line for line in out.splitlines() if "ERROR damaged shard" in line]
    assert len(damaged) == 2
    assert f"{folder / '00001.tar'}: {readable - 20} samples kept; {30 - readable} lost" in damaged[0]
    assert "the file ends inside member" in damaged[0] and "metadata says 10" in damaged[0]
    assert f"{folder / '00002.tar'}: 0 samples kept; 10 lost" in damaged[1] and "not a tar member header" in damaged[1]
    assert "2 damaged shards" in out


def test_check_reads_a_seeded_sample_unless_full(tmp_path: Path, capsys) -> None:
    from qformer.data.synth_shards import write_shards

    info = write_shards(tmp_path, "jsonl", shards=10, per_shard=3, seed=1, image_size=16)
    manifest = Path(info["folder"]) / "00004.jsonl"
    manifest.write_text(manifest.read_text() + "{not json\n")
    exp = _shard_experiment(tmp_path, info["storage"])
    assert main(["data", "check", "--cfg-path", str(exp)]) == 0  # a bad line is a lost record, not damage
    sampled = capsys.readouterr().out
    assert "verified 8 of 10 (a seeded sample; --full reads all)" in sampled
    assert "about 30 readable samples in all 10 shards (from the 8 read)" in sampled
    assert main(["data", "check", "--cfg-path", str(exp), "--full"]) == 0
    full = capsys.readouterr().out
    assert "verified 10 of 10 (all)" in full and "samples 30 readable, 1 lost (malformed 1)" in full
    assert f"lost records in {manifest}: 3 samples kept; 1 lost (malformed 1)" in full
    assert f"skipped {manifest}#line 4: not JSON" in full


def test_check_names_an_unreadable_parquet_footer(tmp_path: Path, capsys) -> None:
    from qformer.data.synth_shards import write_shards

    info = write_shards(tmp_path, "parquet", shards=2, per_shard=6, seed=1, image_size=16)
    bad = Path(info["folder"]) / "00001.parquet"
    bad.write_bytes(bad.read_bytes()[:-100])  # the footer cut off
    assert main(["data", "check", "--cfg-path", str(_shard_experiment(tmp_path, info["storage"]))]) == 1
    out = capsys.readouterr().out
    assert "samples 6 readable, 1 lost (damaged_shard 1); metadata says 6 for the 1 of them that have it" in out
    assert f"ERROR damaged shard {bad}: 0 samples kept; 1 lost" in out and "unreadable after 0 samples" in out

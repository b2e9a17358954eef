"""Small stand-ins for what `qformer data download` fetches, served at LAVIS's relative URL paths.

COCO: a synthetic caption set (qformer.data.synth) renamed as COCO 2014 (`train2014/COCO_train2014_<id>.jpg`
in train2014.zip, val/test images in val2014.zip) with Karpathy annotation files that name them. VG: images
split over images.zip (`VG_100K/`) and images2.zip (`VG_100K_2/`) and a vg_caption.json with LAVIS's
absolute `/export/share/...` paths. Flickr30K: its three annotation files.

`standin_catalog(monkeypatch, md5s)` makes the catalogue publish the stand-ins' MD5s where LAVIS publishes
one (the real MD5s would reject the stand-ins), so the published-checksum path is exercised.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from pathlib import Path

from qformer.data.synth import write_synthetic

ANN = "/sfr-vision-language-research/datasets"
VG_ANN = "/sfr-vision-language-research/LAVIS/datasets/visual_genome/vg_caption.json"


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def coco_standin(tmp: Path) -> dict[str, bytes]:
    """URL path -> body for COCO 2014 + Karpathy annotations (8 train images, 2 captions each; 2 val, 2 test)."""
    write_synthetic(tmp, n_train=8, n_val=2, n_test=2, image_size=64, captions_per_image=2, seed=5)
    files: dict[str, bytes] = {}
    zips: dict[str, dict[str, bytes]] = {"train2014": {}, "val2014": {}}
    for split in ("train", "val", "test"):
        records = json.loads((tmp / "annotations" / f"coco_karpathy_{split}.json").read_text())
        folder = "train2014" if split == "train" else "val2014"
        renamed = {}
        for rec in records:
            if rec["image"] not in renamed:
                n = 100 * ("train val test".split().index(split)) + len(renamed) + 1
                renamed[rec["image"]] = f"{folder}/COCO_{folder}_{n:012d}.jpg"
                zips[folder][renamed[rec["image"]]] = (tmp / "images" / rec["image"]).read_bytes()
            rec["image"] = renamed[rec["image"]]
        files[f"{ANN}/coco_karpathy_{split}.json"] = json.dumps(records).encode()
    for folder, members in zips.items():
        files[f"/zips/{folder}.zip"] = zip_bytes(members)
    return files


def vg_standin(tmp: Path) -> dict[str, bytes]:
    """URL path -> body for Visual Genome: 4 images over two archives, 2 region captions each."""
    write_synthetic(tmp / "vg_src", n_train=4, n_val=0, n_test=0, image_size=64, captions_per_image=2, seed=6)
    records = json.loads((tmp / "vg_src" / "annotations" / "coco_karpathy_train.json").read_text())
    first, second, anns, ids = {}, {}, [], {}
    for rec in records:
        image_id = ids.setdefault(rec["image"], 10 + len(ids))
        target = first if image_id < 12 else second
        target[f"{'VG_100K' if target is first else 'VG_100K_2'}/{image_id}.jpg"] = \
            (tmp / "vg_src" / "images" / rec["image"]).read_bytes()
        anns.append({"image": f"/export/share/datasets/vision/visual-genome/image/{image_id}.jpg",
                     "caption": rec["caption"], "image_id": f"vg_{image_id}"})
    return {VG_ANN: json.dumps(anns).encode(), "/people/rak248/VG_100K_2/images.zip": zip_bytes(first),
            "/people/rak248/VG_100K_2/images2.zip": zip_bytes(second)}


def flickr_standin() -> dict[str, bytes]:
    rec = [{"image": "flickr30k-images/1000092795.jpg", "caption": ["two young guys", "two men outside"]}]
    return {f"{ANN}/flickr30k_{s}.json": json.dumps(rec).encode() for s in ("train", "val", "test")}


def standin_catalog(monkeypatch, bodies: dict[str, bytes]) -> None:
    """Published MD5s -> the stand-ins' MD5s, in the catalogue the download job reads."""
    from urllib.parse import urlsplit

    import qformer.jobs.data_download as job
    from qformer.data.download_catalog import dataset_download

    def patched(name: str):
        plan = dataset_download(name)
        assets = tuple(dataclasses.replace(a, md5=hashlib.md5(bodies[urlsplit(a.url).path]).hexdigest())
                       if a.md5 and urlsplit(a.url).path in bodies else a for a in plan.assets)
        return dataclasses.replace(plan, assets=assets)

    monkeypatch.setattr(job, "dataset_download", patched)

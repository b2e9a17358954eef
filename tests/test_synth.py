"""`qformer data synth`: layout, determinism, captions that need the image, the CLI."""
from __future__ import annotations

import hashlib
import re
import json
from pathlib import Path

import numpy as np
from PIL import Image

from qformer.cli import main
from qformer.data.processors.text import pre_caption
from qformer.data.synth import COLOURS, SHAPES, write_synthetic


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_layout_and_formats(synth_data: Path) -> None:
    train = json.loads((synth_data / "annotations/coco_karpathy_train.json").read_text())
    val = json.loads((synth_data / "annotations/coco_karpathy_val.json").read_text())
    assert len(train) == 48 * 5 and len(val) == 16
    assert {"image", "caption", "image_id"} <= set(train[0]) and isinstance(train[0]["caption"], str)
    assert isinstance(val[0]["caption"], list) and len(val[0]["caption"]) == 5
    img = Image.open(synth_data / "images" / val[0]["image"])
    assert img.format == "JPEG" and img.size == (72, 72) and img.mode == "RGB"
    assert len({r["image_id"] for r in train}) == 48


def test_deterministic_by_seed(tmp_path: Path) -> None:
    write_synthetic(tmp_path / "a", 6, 2, 2, seed=5, image_size=32)
    write_synthetic(tmp_path / "b", 6, 2, 2, seed=5, image_size=32)
    write_synthetic(tmp_path / "c", 6, 2, 2, seed=6, image_size=32)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_captions_vary_and_need_cleaning(synth_data: Path) -> None:
    caps = [r["caption"] for r in json.loads((synth_data / "annotations/coco_karpathy_train.json").read_text())]
    assert len(set(caps)) > 200  # templates and synonyms vary
    assert any(pre_caption(c) != c.lower().strip() for c in caps)  # some punctuation to remove
    assert all(any(col in c.lower() for col in COLOURS) and any(s in c for s in SHAPES) for c in caps)


def test_caption_colour_is_in_the_pixels(tmp_path: Path) -> None:
    """The named shape colour is present in the image (captions describe pixels, not noise)."""
    write_synthetic(tmp_path, 30, 0, 0, seed=2, image_size=64)
    for rec in json.loads((tmp_path / "annotations/coco_karpathy_train.json").read_text())[::5]:
        words = re.findall(r"[a-z]+", rec["caption"].lower())
        colour = next(c for c in COLOURS if c in words)  # ("red" is inside "coloured")
        pix = np.asarray(Image.open(tmp_path / "images" / rec["image"])).reshape(-1, 3).astype(int)
        assert (np.abs(pix - COLOURS[colour]).max(axis=1) < 45).sum() > 20


def test_cli_synth(tmp_path: Path, capsys) -> None:
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--n-train", "3", "--n-val", "2", "--n-test", "1", "--image-size", "32"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "s/annotations/coco_karpathy_test.json").read_text())) == 1
    assert len(list((tmp_path / "s/images/train").glob("*.jpg"))) == 3


def test_non_square_and_noisy_pictures(tmp_path: Path) -> None:
    """(width, height) sizes (COCO-like 4:3) and photo-like noise, for benchmarks; the default is unchanged."""
    write_synthetic(tmp_path / "flat", 4, 0, 0, seed=3, image_size=(80, 60))
    write_synthetic(tmp_path / "noisy", 4, 0, 0, seed=3, image_size=(80, 60), noise=16.0)
    flat = sorted((tmp_path / "flat/images/train").glob("*.jpg"))
    noisy = sorted((tmp_path / "noisy/images/train").glob("*.jpg"))
    assert [Image.open(p).size for p in flat + noisy] == [(80, 60)] * 8
    # same scenes and captions, but the noise costs bytes (as a photograph's texture does)
    assert (tmp_path / "flat/annotations/coco_karpathy_train.json").read_text() == \
        (tmp_path / "noisy/annotations/coco_karpathy_train.json").read_text()
    assert sum(p.stat().st_size for p in noisy) > 2 * sum(p.stat().st_size for p in flat)
    assert np.asarray(Image.open(noisy[0])).astype(int).std() > np.asarray(Image.open(flat[0])).astype(int).std()
    info = json.loads((tmp_path / "noisy/synth_info.json").read_text())
    assert info["image_size"] == [80, 60] and info["noise"] == 16.0
    assert "noise" not in json.loads((tmp_path / "flat/synth_info.json").read_text())

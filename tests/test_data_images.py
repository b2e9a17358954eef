"""Decoding odd and broken image files: RGB uint8 out, or ImageDecodeError naming file and reason."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qformer.core.errors import ImageDecodeError
from qformer.data.images import load_rgb
from qformer.data.processors import build_processor
from qformer.data.transform import eval_batch


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="nope.jpg: file not found"):
        load_rgb(tmp_path / "nope.jpg")


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.jpg: empty file"):
        load_rgb(tmp_path / "empty.jpg")


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG")
    with pytest.raises(ImageDecodeError, match="text.jpg: not a recognised image format"):
        load_rgb(tmp_path / "text.jpg")


def test_truncated_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="cut.jpg: cannot decode"):
        load_rgb(tmp_path / "cut.jpg")


@pytest.mark.parametrize("mode", ["L", "CMYK", "1", "I;16", "P"])
def test_other_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    base = Image.new("RGB", (10, 8), (200, 100, 50))
    if mode == "I;16":
        img = Image.fromarray(np.full((8, 10), 40000, dtype=np.uint16))
        path = _save(img, tmp_path / "deep.png")
    elif mode == "CMYK":
        path = _save(base.convert("CMYK"), tmp_path / "cmyk.jpg")
    elif mode == "P":
        path = _save(base.convert("P", palette=Image.Palette.ADAPTIVE), tmp_path / "pal.png")
    else:
        path = _save(base.convert(mode), tmp_path / f"m{mode}.png")
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (10, 8)
    if mode == "I;16":  # 16-bit scaled to 8 bits, not clipped to white
        assert np.asarray(out)[0, 0].tolist() == [40000 >> 8] * 3
    if mode == "P":
        assert np.abs(np.asarray(out)[0, 0].astype(int) - [200, 100, 50]).max() <= 8


def test_rgba_and_transparent_palette_composite_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = np.asarray(load_rgb(_save(rgba, tmp_path / "a.png")))
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    pal = rgba.convert("P")  # keeps transparency in info
    pal.info["transparency"] = pal.getpixel((1, 1))
    out = np.asarray(load_rgb(_save(pal, tmp_path / "p.png", transparency=pal.getpixel((1, 1)))))
    assert out[1, 1].tolist() == [255, 255, 255]


def test_exif_rotation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = _save(img, tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_rgb(path)
    assert out.size == (20, 40)  # upright: portrait
    top = np.asarray(out)[2, 10]
    assert top[0] > 200 and top[2] < 60  # red half now on top


def test_decompression_bomb_rejected_with_clear_message(tmp_path: Path) -> None:
    path = _save(Image.new("L", (300, 300)), tmp_path / "bomb.png")
    with pytest.raises(ImageDecodeError, match=r"bomb.png: 300x300 = 90000 pixels exceeds the decompression-bomb limit of 10000"):
        load_rgb(path, max_pixels=10_000)


def test_pillow_bomb_guard_is_caught(tmp_path: Path, monkeypatch) -> None:
    path = _save(Image.new("L", (300, 300)), tmp_path / "bomb2.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # Pillow raises above 2x this
    with pytest.raises(ImageDecodeError, match="bomb2.png: rejected by Pillow's decompression-bomb guard"):
        load_rgb(path, max_pixels=None)


def test_eval_batch_skips_bad_images_and_keeps_indices(tmp_path: Path) -> None:
    good = _save(Image.new("RGB", (20, 20), (1, 2, 3)), tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"")
    proc = build_processor({"name": "blip_image_eval", "image_size": 16})
    out = eval_batch({"index": np.array([5, 6, 7]), "path": np.array([str(good), str(tmp_path / "bad.jpg"), str(good)])}, proc)
    assert out["index"].tolist() == [5, 7]
    assert out["image"].shape == (2, 3, 16, 16) and out["image"].dtype == np.uint8
    empty = eval_batch({"index": np.array([1]), "path": np.array([str(tmp_path / "missing.jpg")])}, proc)
    assert empty["image"].shape == (0, 3, 16, 16) and empty["index"].shape == (0,)

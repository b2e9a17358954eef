"""Reduced decode (run.data.train_decode / eval_decode: reduced): the same crop and flip as the exact path,
a JPEG decoded at the largest draft factor that keeps the output size, pixels within resampling of LAVIS's."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import data_config
from qformer.core.errors import ConfigError
from qformer.data.builders import build_builder
from qformer.data.images import load_rgb, open_encoded
from qformer.data.processors import build_processor
from qformer.data.processors.image import reduction_factor
from qformer.data.synth import coco_caption_section


def _scene_jpeg(width: int = 640, height: int = 480, seed: int = 0, **save) -> bytes:
    """A photo-like JPEG: smooth gradients, hard-edged shapes and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    for _ in range(6):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(20, 120)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def _pair(name: str, size: int, **kwargs):
    exact = build_processor({"name": name, "image_size": size, **kwargs})
    reduced = build_processor({"name": name, "image_size": size, **kwargs})
    reduced.reduced_decode = True
    return exact, reduced


def test_reduction_factor_keeps_the_output_size() -> None:
    assert reduction_factor(640, 480, 224) == 2       # 320 x 240 still >= 224
    assert reduction_factor(447, 480, 224) == 1       # 223 < 224: decode whole
    assert reduction_factor(640, 480, 60) == 8
    assert reduction_factor(640, 480, 61) == 4
    assert reduction_factor(100, 100, 224) == 1       # smaller than the output: whole, upsampled


@pytest.mark.parametrize("name", ["blip2_image_train", "blip_image_train"])
def test_reduced_train_matches_exact_within_resampling(name: str) -> None:
    exact, reduced = _pair(name, 64)
    diffs = []
    for seed in range(12):
        data = _scene_jpeg(seed=seed)
        rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
        a = exact(load_rgb("scene.jpg", data=data), rng_a)
        b = reduced.process(open_encoded("scene.jpg", data=data), rng_b)
        assert b.shape == a.shape == (3, 64, 64) and b.dtype == np.uint8
        assert rng_a.random() == rng_b.random()  # the same draws, in the same order: same box, flip, ops
        diffs.append(np.abs(a.astype(int) - b).mean())
    # a wrong box, a missed flip or a swapped factor moves tens of grey levels, resampling one or two
    assert 0 < np.mean(diffs) < 3, diffs


def test_reduced_decode_draws_at_most_the_needed_factor() -> None:
    """A 640x480 JPEG with crops of >= 448 px on a side decodes at half size for a 224 px output."""
    encoded = open_encoded("scene.jpg", data=_scene_jpeg())
    img, factor = encoded.decode_reduced(reduction_factor(640, 480, 224))
    assert factor == 2 and img.size == (320, 240) and img.mode == "RGB"
    png = io.BytesIO()
    Image.open(io.BytesIO(_scene_jpeg())).save(png, "PNG")
    img, factor = open_encoded("scene.png", data=png.getvalue()).decode_reduced(4)
    assert factor == 1 and img.size == (640, 480)  # only JPEG has DCT scaling: whole, and said so


def test_reduced_decode_follows_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    data = _scene_jpeg(exif=exif)
    encoded = open_encoded("rot.jpg", data=data)
    assert encoded.size == (480, 640)
    exact, reduced = _pair("blip2_image_train", 48, min_scale=1.0)
    a = exact(load_rgb("rot.jpg", data=data), np.random.default_rng(1))
    b = reduced.process(encoded, np.random.default_rng(1))
    assert np.abs(a.astype(int) - b).mean() < 3


def test_eval_reduced_only_when_asked(tmp_path: Path) -> None:
    exact, reduced = _pair("blip_image_eval", 56)
    data = _scene_jpeg(seed=3)
    a = exact.process(open_encoded("e.jpg", data=data))
    np.testing.assert_array_equal(a, exact(load_rgb("e.jpg", data=data)))  # exact is LAVIS's resize
    b = reduced.process(open_encoded("e.jpg", data=data))
    assert 0 < np.abs(a.astype(int) - b).mean() < 3


def test_builder_sets_the_decode_from_run_data(shapes) -> None:
    datasets = coco_caption_section(shapes)

    def vis(split_kind: str, **data):
        cfg = data_config(datasets, {"image_size": 64}, data=data)
        return build_builder(cfg, "coco_caption").processor("vis_processor", split_kind)

    assert vis("train").reduced_decode and not vis("eval").reduced_decode  # defaults: reduced train, exact eval
    assert not vis("train", train_decode="exact").reduced_decode
    assert vis("eval", eval_decode="reduced").reduced_decode
    with pytest.raises(ConfigError, match="run.data.eval_decode"):
        vis("eval", eval_decode="fast")

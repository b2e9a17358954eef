"""Processors: blip_caption text rules (spec §2.5) and the image processors' pixels, shapes, ranges."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qformer.data.normalize import normalize_uint8
from qformer.data.processors import CLIP_MEAN, CLIP_STD, build_processor
from qformer.data.processors.image import random_resized_crop_box
from qformer.data.processors.randaugment import OPS, RandomAugment
from qformer.data.processors.text import BlipCaptionProcessor, pre_caption


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A Dog.", "a dog"),
        ("Hello!!  World", "hello world"),  # '!!' -> two spaces, then the run of 4 collapses
        ('He said "hi" (twice)*#:;~', "he said hi twice"),
        ("commas, apostrophes' hyphen-ated? kept", "commas, apostrophes' hyphen-ated? kept"),
        ("  leading and trailing  ", "leading and trailing"),
        ("tab\there", "tab\there"),  # a single tab is not a run of >= 2 whitespace chars
        ("two\t\ttabs", "two tabs"),
        ("line end\n", "line end"),
        ("brackets [x] {y} / \\ & @ stay", "brackets [x] {y} / \\ & @ stay"),
        ("...", ""),
        ("", ""),
        ("UPPER. lower", "upper lower"),
        ("a.b", "a b"),
    ],
)
def test_pre_caption_rules(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_max_words_and_prompt() -> None:
    long = " ".join(f"w{i}" for i in range(80))
    out = pre_caption(long)
    assert out.split(" ") == [f"w{i}" for i in range(50)]
    proc = BlipCaptionProcessor.from_config({"prompt": "a photo of ", "max_words": 3})
    assert proc("One two three four.") == "a photo of one two three"
    # words are counted after the regex: "a.b.c" is three words
    assert pre_caption("a.b.c d", max_words=2) == "a b"


def test_build_processor_by_registry_name() -> None:
    assert build_processor(None) is None
    assert isinstance(build_processor({"name": "blip_caption"}), BlipCaptionProcessor)
    proc = build_processor({"name": "blip2_image_train", "image_size": 32, "min_scale": 0.9})
    assert proc.image_size == 32 and proc.scale == (0.9, 1.0)
    with pytest.raises(KeyError, match="blip_image_train"):
        build_processor({"name": "blip_image_trian"})


def _photo(w: int = 90, h: int = 70, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["blip2_image_train", "blip_image_train", "blip_image_eval"])
def test_image_processors_shape_dtype(name: str) -> None:
    proc = build_processor({"name": name, "image_size": 40})
    out = proc(_photo(), np.random.default_rng(0))
    assert out.shape == (3, 40, 40) and out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]


def test_class_default_sizes() -> None:
    assert build_processor({"name": "blip2_image_train"}).image_size == 364
    assert build_processor({"name": "blip_image_train"}).image_size == 384
    assert build_processor({"name": "blip_image_eval"}).image_size == 384


def test_eval_matches_torchvision_resize_totensor_normalize() -> None:
    from torchvision import transforms as T

    img = _photo(53, 81)
    ours = normalize_uint8(torch.from_numpy(build_processor({"name": "blip_image_eval", "image_size": 32})(img))[None])[0]
    ref = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                     T.Normalize(CLIP_MEAN, CLIP_STD)])(img)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_train_crop_is_torchvision_resized_crop() -> None:
    """Given the same box, our crop+bicubic resize equals torchvision's F.resized_crop pixel for pixel."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    img = _photo(120, 90)
    proc = build_processor({"name": "blip2_image_train", "image_size": 48})
    seed = 3
    rng = np.random.default_rng(seed)
    top, left, h, w = random_resized_crop_box(120, 90, proc.scale, proc.ratio, rng)
    flip = rng.random() < 0.5
    ref = F.resized_crop(img, top, left, h, w, [48, 48], InterpolationMode.BICUBIC)
    if flip:
        ref = F.hflip(ref)
    ours = proc(img, np.random.default_rng(seed))
    np.testing.assert_array_equal(ours, np.asarray(ref).transpose(2, 0, 1))


def test_crop_box_respects_scale_and_ratio() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(200, 100, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 200
        area = h * w / (200 * 100)
        assert 0.45 <= area <= 1.0
    # impossible scale -> torchvision's centre-crop fallback clipped to the ratio bounds
    assert random_resized_crop_box(400, 100, (5.0, 6.0), (3 / 4, 4 / 3), rng) == (0, 133, 100, 133)


def test_flip_happens_about_half_the_time() -> None:
    img = Image.new("RGB", (40, 40), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 40))  # left half white
    proc = build_processor({"name": "blip2_image_train", "image_size": 40, "min_scale": 1.0, "max_scale": 1.0})
    rng = np.random.default_rng(0)
    left_white = [proc(img, rng)[0, 20, 2] > 128 for _ in range(200)]
    assert 60 < sum(left_white) < 140


def test_randaugment_samples_with_replacement_and_applies_half() -> None:
    ra = RandomAugment()
    rng = np.random.default_rng(0)
    draws = [tuple(ra.sample_ops(rng)) for _ in range(2000)]
    assert all(len(d) == 2 for d in draws)
    assert any(a == b for a, b in draws)  # with replacement
    assert {op for d in draws for op in d} == set(OPS)


def test_randaugment_ops_at_level_5() -> None:
    rng = np.random.default_rng(0)
    img = _photo(32, 32)
    # Brightness/Sharpness at M=5: factor 1.0 -> exact no-ops (as in LAVIS)
    assert np.array_equal(np.asarray(OPS["Brightness"](img, 5, rng)), np.asarray(img))
    assert np.array_equal(np.asarray(OPS["Sharpness"](img, 5, rng)), np.asarray(img))
    # TranslateX by +-5 px fills a 5-px strip with grey 128
    out = np.asarray(OPS["TranslateX"](img, 5, rng))
    strip = out[:, :5] if (out[:, :5] == 128).all() else out[:, -5:]
    assert (strip == 128).all()
    # Rotate by 15 degrees leaves grey corners
    rot = np.asarray(OPS["Rotate"](img, 5, rng))
    assert (rot[0, 0] == 128).all()
    # AutoContrast stretches a low-contrast image to the full range
    flat = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))
    flat.putpixel((0, 0), (110, 110, 110))
    ac = np.asarray(OPS["AutoContrast"](flat, 5, rng))
    assert ac.min() == 0 and ac.max() == 255


def test_blip_image_train_is_deterministic_given_rng() -> None:
    proc = build_processor({"name": "blip_image_train", "image_size": 32})
    img = _photo()
    a = proc(img, np.random.default_rng(7))
    b = proc(img, np.random.default_rng(7))
    c = proc(img, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_normalize_uint8() -> None:
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2).contiguous()
    y = normalize_uint8(x)
    assert y.dtype == torch.float32
    for c in range(3):
        assert y[0, c, 0, 0].item() == pytest.approx(-CLIP_MEAN[c] / CLIP_STD[c], rel=1e-6)
        assert y[0, c, 0, 1].item() == pytest.approx((1 - CLIP_MEAN[c]) / CLIP_STD[c], rel=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        normalize_uint8(x.float())

"""A synthetic COCO-Karpathy-format caption set: one coloured shape per picture, templated captions.

Every attribute a caption names (shape colour, shape, size, position, background colour) is drawn
independently per image and visible only in the pixels, and caption templates are drawn
independently of the attributes, so neither the caption wording alone nor the image statistics
alone identify a match: retrieval requires reading the image. Some templates carry punctuation
(`.!:;()~`) and capitals that `blip_caption` removes. Same seed -> byte-identical files.

Layout (what `qformer data synth --out DIR` writes; the demo config points coco_caption at it):
  DIR/annotations/coco_karpathy_train.json   one record per caption {image, caption, image_id}
  DIR/annotations/coco_karpathy_{val,test}.json  one record per image {image, caption: [...], image_id}
  DIR/images/{train,val,test}/<split>_<n>.jpg
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 180), "orange": (250, 140, 20), "pink": (250, 130, 190), "cyan": (40, 210, 220),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128), "brown": (110, 70, 35)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.13, "medium": 0.2, "large": 0.28}  # half-extent as a fraction of the side
POSITIONS = {
    "top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7), "center": (0.5, 0.5),
}
POSITION_WORDS = {
    "top left": ("top left", "upper left corner", "top-left"),
    "top right": ("top right", "upper right corner", "top-right"),
    "bottom left": ("bottom left", "lower left corner", "bottom-left"),
    "bottom right": ("bottom right", "lower right corner", "bottom-right"),
    "center": ("center", "middle", "centre"),
}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium", "medium-sized", "mid-sized"),
              "large": ("large", "big", "huge")}
TEMPLATES = (
    "a {size} {colour} {shape} in the {pos} on a {bg} background.",
    "A {colour} {shape}, {size}, at the {pos} of a {bg} picture!",
    "There is a {size} {colour} {shape} ({pos}) on {bg}.",
    "{Bg} background with a {colour} {shape} near the {pos}; it is {size}.",
    "The image shows one {size} {shape} coloured {colour}:  {pos}, {bg} backdrop ~",
    "{size} {colour} {shape} placed in the {pos} over a plain {bg} canvas",
    "On a {bg} background, a {size} {colour} {shape} sits in the {pos}...",
    "\"{Colour} {shape}\" -- {size}, {pos}, {bg} background",
)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str
    background: str


def sample_scene(rng: np.random.Generator) -> Scene:
    colour = str(rng.choice(list(COLOURS)))
    return Scene(colour, str(rng.choice(SHAPES)), str(rng.choice(list(SIZES))), str(rng.choice(list(POSITIONS))),
                 str(rng.choice(list(BACKGROUNDS))))


def _dims(size: int | tuple[int, int]) -> tuple[int, int]:
    """`size` as (width, height): an int is a square side."""
    if isinstance(size, int):
        return size, size
    width, height = (int(v) for v in size)
    return width, height


def render(scene: Scene, size: int | tuple[int, int], rng: np.random.Generator, noise: float = 0.0,
           noise_rng: np.random.Generator | None = None) -> Image.Image:
    """Draw the scene with small jitter in place, extent and colour (so pixels aren't a lookup table).

    `size`: side, or (width, height) for non-square pictures (the shape's extent follows the shorter
    side). `noise` > 0 adds per-pixel Gaussian noise of that standard deviation (grey levels), which
    gives JPEGs the entropy of photographs (flat shapes compress ~10x smaller than a COCO photo and
    decode faster), for benchmarks, drawn from `noise_rng` (default `rng`) so that a separate
    generator leaves scenes and captions as they are without noise."""
    width, height = _dims(size)
    bg = np.clip(np.array(BACKGROUNDS[scene.background]) + rng.integers(-12, 13, 3), 0, 255)
    img = Image.new("RGB", (width, height), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[scene.position]
    cx = (fx + rng.uniform(-0.04, 0.04)) * width
    cy = (fy + rng.uniform(-0.04, 0.04)) * height
    r = SIZES[scene.size] * min(width, height) * rng.uniform(0.9, 1.1)
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[scene.colour]) + rng.integers(-20, 21, 3), 0, 255))
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif scene.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # cross
        t = r / 3
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    if noise > 0:
        pixels = np.asarray(img, dtype=np.float32) + (noise_rng or rng).normal(0.0, noise, (height, width, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return img


def captions(scene: Scene, n: int, rng: np.random.Generator) -> list[str]:
    out = []
    for t in rng.choice(len(TEMPLATES), size=n, replace=n > len(TEMPLATES)):
        words = {
            "size": str(rng.choice(SIZE_WORDS[scene.size])), "colour": scene.colour, "shape": scene.shape,
            "pos": str(rng.choice(POSITION_WORDS[scene.position])), "bg": scene.background,
        }
        words.update({k.capitalize(): v.capitalize() for k, v in list(words.items())})
        out.append(TEMPLATES[int(t)].format(**words))
    return out


def caption_words() -> list[str]:
    """Every lower-case word a caption can hold, sorted: the vocabulary of a small test-sized BERT."""
    texts = [re.sub(r"\{\w+\}", " ", t) for t in TEMPLATES]  # the templates' own words, not their slots
    texts += [*COLOURS, *BACKGROUNDS, *SHAPES, *(w for ws in SIZE_WORDS.values() for w in ws),
              *(w for ws in POSITION_WORDS.values() for w in ws)]
    return sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower())})


def write_synthetic(
    out: str | Path, n_train: int = 2000, n_val: int = 200, n_test: int = 200, seed: int = 0,
    image_size: int | tuple[int, int] = 96, captions_per_image: int = 5, noise: float = 0.0,
) -> dict[str, int]:
    """Write the data set under `out`; returns {split: number of images}.

    `image_size`: side of square pictures, or (width, height), e.g. (640, 480) for COCO-sized ones;
    `noise`: see `render` (0: flat shapes, the default and what the demo uses)."""
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng([seed, 1])  # its own stream: noise changes pixels, not scenes/captions
    counts = {"train": n_train, "val": n_val, "test": n_test}
    next_id = 0
    for split, n in counts.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(n):
            scene = sample_scene(rng)
            rel = f"{split}/{split}_{i:06d}.jpg"
            render(scene, image_size, rng, noise, noise_rng).save(out / "images" / rel, format="JPEG", quality=90)
            caps = captions(scene, captions_per_image, rng)
            image_id = f"synth_{next_id}"
            next_id += 1
            if split == "train":
                records += [{"image": rel, "caption": c, "image_id": image_id} for c in caps]
            else:
                records.append({"image": rel, "caption": caps, "image_id": image_id})
        with open(out / "annotations" / f"coco_karpathy_{split}.json", "w") as f:
            json.dump(records, f)
    width, height = _dims(image_size)
    info = {"generator": "qformer data synth", "seed": seed, "image_size": width if width == height else [width, height],
            **({"noise": noise} if noise else {}), "captions_per_image": captions_per_image, **{f"n_{k}": v for k, v in counts.items()}}
    (out / "synth_info.json").write_text(json.dumps(info, indent=2))
    return counts


def coco_caption_section(root: str | Path) -> dict:
    """`datasets:` entry pointing coco_caption at a synthetic set under `root` (for tests and tools)."""
    root = Path(root)
    anns = {s: {"storage": str(root / "annotations" / f"coco_karpathy_{s}.json")} for s in ("train", "val", "test")}
    return {"coco_caption": {"build_info": {"annotations": anns, "images": {"storage": str(root / "images")}}}}

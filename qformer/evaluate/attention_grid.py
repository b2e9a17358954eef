"""The query attention grid: for each of a few images, the image and one heat map per query over it.

Each heat map is a query's cross-attention over the patch grid (last cross-attention layer, mean over
heads; qformer.models.attention_maps), shown as attention above the uniform share (`contrast`: a query
that spreads its attention evenly stays dark, one that specialises shows a hot spot), upsampled to the
tile and blended over a grey copy of the image the model saw. Above each map: the query number and the
share of attention on its hottest patch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from qformer.evaluate.drawing import BACKGROUND, LINE_HEIGHT, MUTED, TEXT, fit, font, tile

TILE = 72
GAP = 4
COLS = 8  # query maps per row
PAD = 10
HEADER = 30 + 20  # title, explanation, colour scale
RAMP = 160  # width of the colour scale
NEAR_UNIFORM = 0.05  # a row whose hottest map stays below this contrast is said to be near uniform

# a black-body style colour ramp (dark -> red -> yellow -> white) in 5 stops
_STOPS = np.array([[0, 0, 0], [90, 0, 110], [220, 40, 30], [255, 200, 0], [255, 255, 230]], dtype=np.float32)


@dataclass
class Tile:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)
    image: int  # which image (row block)
    query: int | None  # None: the image itself


def heat_colours(values: np.ndarray) -> np.ndarray:
    """[...] in [0, 1] -> [..., 3] uint8 along the colour ramp."""
    x = np.clip(values, 0.0, 1.0) * (len(_STOPS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_STOPS) - 2)
    frac = (x - lo)[..., None]
    return (_STOPS[lo] * (1 - frac) + _STOPS[lo + 1] * frac).round().astype(np.uint8)


def contrast(attention: np.ndarray, n_tokens: int | None = None) -> np.ndarray:
    """Attention above uniform, in [0, 1]: (p - u) / max(peak - u, u) with u = 1 / tokens.

    A query that attends evenly (an untrained one) stays dark; one whose peak is at least twice the
    uniform share reaches full colour at its peak, so hot spots mean real specialisation, not noise.
    `n_tokens` defaults to the map's size (the image tokens the softmax ran over, e.g. with CLS, may be more).
    """
    uniform = 1.0 / float(n_tokens or attention.size)
    return np.clip((attention - uniform) / max(float(attention.max()) - uniform, uniform), 0.0, 1.0)


def heat_tile(image: np.ndarray, attention: np.ndarray, size: int = TILE, n_tokens: int | None = None) -> Image.Image:
    """One query's [g, g] attention (see `contrast`) as a heat overlay on `image` (uint8 HWC or CHW)."""
    scaled = contrast(attention, n_tokens).astype(np.float32)
    heat = np.asarray(Image.fromarray(scaled, mode="F").resize((size, size), Image.BILINEAR))
    alpha = (0.2 + 0.7 * np.clip(heat, 0.0, 1.0))[..., None]  # the image stays visible where nothing is hot
    grey = np.asarray(tile(image, size).convert("L").convert("RGB"), dtype=np.float32)
    return Image.fromarray((alpha * heat_colours(heat) + (1 - alpha) * grey).round().astype(np.uint8))


def render_attention_grid(images: Sequence[np.ndarray], maps: np.ndarray, names: Sequence[str], title: str = "",
                          n_tokens: int | None = None) -> tuple[Image.Image, list[Tile]]:
    """images: uint8 images as the model saw them; maps: [n_images, queries, g, g] (n_tokens: the tokens the
    attention was spread over, prefix tokens included) -> (RGB image, tiles)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 4 or maps.shape[0] != len(images) or maps.shape[2] != maps.shape[3]:
        raise ValueError(f"maps must be [n_images={len(images)}, queries, g, g], got {maps.shape}")
    n_img, n_q = maps.shape[:2]
    cols = max(1, min(COLS, n_q))
    rows = -(-n_q // cols)
    cell_h = TILE + LINE_HEIGHT + GAP  # label above each map
    block_h = LINE_HEIGHT + rows * cell_h + PAD
    left = PAD + TILE + 2 * PAD  # the image itself, then the maps
    width = max(left + cols * (TILE + GAP) + PAD, 560)  # room for the title lines
    height = PAD + HEADER + n_img * block_h
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), fit(title or "query cross-attention", width - 2 * PAD, draw), fill=TEXT, font=font())
    draw.text((PAD, PAD + LINE_HEIGHT), fit("last cross-attention layer, mean over heads; colour: attention above "
                                            "uniform (label: share on the hottest patch)", width - 2 * PAD, draw),
              fill=MUTED, font=font())
    uniform = 1.0 / float(n_tokens or maps.shape[2] * maps.shape[3])
    _colour_scale(canvas, draw, PAD, PAD + 2 * LINE_HEIGHT + 4, uniform)
    tiles: list[Tile] = []
    y = PAD + HEADER
    for b in range(n_img):
        name = Path(names[b]).name
        if max(float(contrast(m, n_tokens).max()) for m in maps[b]) < NEAR_UNIFORM:  # why this row shows no colour
            name += (f"  (every query near uniform here: hottest patch {100 * float(maps[b].max()):.1f}% vs "
                     f"uniform {100 * uniform:.1f}%)")
        draw.text((PAD, y), fit(name, width - 2 * PAD, draw), fill=TEXT, font=font())
        top = y + LINE_HEIGHT
        canvas.paste(tile(images[b], TILE), (PAD, top + LINE_HEIGHT))
        tiles.append(Tile((PAD, top + LINE_HEIGHT, PAD + TILE - 1, top + LINE_HEIGHT + TILE - 1), b, None))
        for q in range(n_q):
            x = left + (q % cols) * (TILE + GAP)
            ty = top + (q // cols) * cell_h
            draw.text((x, ty), f"q{q} {100 * float(maps[b, q].max()):.0f}%", fill=MUTED, font=font())
            canvas.paste(heat_tile(images[b], maps[b, q], n_tokens=n_tokens), (x, ty + LINE_HEIGHT))
            tiles.append(Tile((x, ty + LINE_HEIGHT, x + TILE - 1, ty + LINE_HEIGHT + TILE - 1), b, q))
        y += block_h
    return canvas, tiles


def _colour_scale(canvas: Image.Image, draw: ImageDraw.ImageDraw, x: int, y: int, uniform: float) -> None:
    """The ramp `contrast` maps onto: dark at the uniform share, full colour at twice it or more."""
    ramp = heat_colours(np.linspace(0.0, 1.0, RAMP, dtype=np.float32))[None].repeat(10, axis=0)
    left = f"uniform {100 * uniform:.1f}%"
    draw.text((x, y), left, fill=MUTED, font=font())
    x0 = x + int(draw.textlength(left, font=font())) + 6
    canvas.paste(Image.fromarray(ramp), (x0, y + 3))
    draw.text((x0 + RAMP + 6, y), f"the map's hottest patch (at least 2x uniform, {100 * 2 * uniform:.1f}%)", fill=MUTED,
              font=font())

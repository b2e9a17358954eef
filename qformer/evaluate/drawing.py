"""Small Pillow helpers shared by the retrieval gallery and the attention grid (no matplotlib, no font files:
Pillow's built-in font)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
CORRECT = (0, 170, 60)  # the mark of a correct retrieval: tile border / caption box
WRONG = (205, 205, 205)  # the border of any other retrieved item
CORRECT_FILL = (222, 245, 229)  # behind a correct caption
FONT_SIZE = 12
LINE_HEIGHT = 15


@lru_cache(maxsize=4)
def font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font (a scalable one where Pillow has FreeType, else the bitmap one)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def fit(text: str, width: int, draw: ImageDraw.ImageDraw) -> str:
    """`text`, cut with '...' to fit `width` pixels."""
    if draw.textlength(text, font=font()) <= width:
        return text
    while text and draw.textlength(text + "...", font=font()) > width:
        text = text[:-1]
    return text + "..."


def wrap(text: str, width: int, draw: ImageDraw.ImageDraw, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels, at most `max_lines` lines (the last one cut with '...')."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font()) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = fit(lines[-1] + " ...", width, draw)
    return [fit(line, width, draw) for line in lines]


def tile(image: Image.Image | np.ndarray, size: int) -> Image.Image:
    """A square RGB thumbnail of `size` pixels (uint8 HWC or CHW arrays accepted)."""
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.transpose(1, 2, 0)
        image = Image.fromarray(np.ascontiguousarray(image).astype(np.uint8))
    return image.convert("RGB").resize((size, size), Image.BICUBIC)


def framed(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], colour: tuple[int, int, int], width: int) -> None:
    """A rectangle outline of `width` pixels just inside `box`."""
    draw.rectangle(box, outline=colour, width=width)

"""The retrieval gallery: what a few fixed captions and images retrieve, as one PNG (and its JSON).

For `n_captions` captions and `n_images` images picked with a fixed seed (the same ones at every
evaluation of a split, so successive galleries compare), the top `k` results by the evaluation's own
final scores (ITM re-ranked; LAVIS's score_t2i / score_i2t): images for a caption, captions for an
image. A correct result (the caption's own image; one of the image's own captions) is framed in green,
the others in grey. Images are read from the split's own files.

`build_gallery` is pure (score matrices in, picks out); `render_gallery` draws it and returns the
boxes of every mark, which tests read back from the pixels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from qformer.evaluate.drawing import (BACKGROUND, CORRECT, CORRECT_FILL, LINE_HEIGHT, MUTED, TEXT, WRONG, fit, font,
                                      framed, tile, wrap)

TILE = 112  # thumbnail side in pixels
PAD = 10
BORDER = 4  # width of the correct / wrong frame
LEFT = 250  # caption column of the caption->image rows
HEADER = 28


@dataclass
class Hit:
    index: int  # into the split's image_paths (caption->image) or texts (image->caption)
    label: str  # the image path or the caption
    score: float
    correct: bool


@dataclass
class GalleryRow:
    query_index: int  # into the split's texts (caption->image) or image_paths (image->caption)
    query: str  # the caption or the image path
    hits: list[Hit]
    true_rank: int | None = None  # 1-based rank of the first correct result in the whole ranking
    true_score: float | None = None  # and its score


@dataclass
class Gallery:
    split: str
    text_to_image: list[GalleryRow] = field(default_factory=list)
    image_to_text: list[GalleryRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "Gallery":
        """The inverse of to_dict (a logged retrieval_gallery.json back into a Gallery)."""
        def rows(items: list[dict]) -> list[GalleryRow]:
            return [GalleryRow(r["query_index"], r["query"], [Hit(**h) for h in r["hits"]], r.get("true_rank"),
                               r.get("true_score")) for r in items]

        return Gallery(data["split"], rows(data["text_to_image"]), rows(data["image_to_text"]))


@dataclass
class Mark:
    """Where a retrieved item's correct/wrong frame is drawn, and which it is."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive), the outer edge of the frame
    correct: bool
    kind: str  # "image" (caption->image tile) or "caption" (image->caption box)


def fixed_picks(n_items: int, n: int, seed: int) -> list[int]:
    """`n` distinct indices of `n_items`, the same for the same (n_items, n, seed), in increasing order."""
    if n_items <= 0 or n <= 0:
        return []
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_items, size=min(n, n_items), replace=False))


def build_gallery(scores: Any, texts: Sequence[str], image_paths: Sequence[str], *, split: str = "",
                  n_captions: int = 4, n_images: int = 4, k: int = 5, seed: int = 0) -> Gallery:
    """Top-k both ways for the seeded picks. `scores` is a ScoreMatrices (qformer.evaluate.retrieval): its rows
    cover the decodable images and their captions, mapped back to split indices by kept_images / kept_texts."""
    kept_img = list(scores.kept_images) or list(range(scores.i2t.shape[0]))
    kept_txt = list(scores.kept_texts) or list(range(scores.t2i.shape[0]))
    gallery = Gallery(split)
    for t in fixed_picks(len(kept_txt), n_captions, seed):
        order = _top(scores.t2i[t], k)
        hits = [Hit(kept_img[i], str(image_paths[kept_img[i]]), float(scores.t2i[t, i]), i == scores.txt2img[t])
                for i in order]
        rank, score = _first_correct(scores.t2i[t], {int(scores.txt2img[t])})
        gallery.text_to_image.append(GalleryRow(kept_txt[t], str(texts[kept_txt[t]]), hits, rank, score))
    for i in fixed_picks(len(kept_img), n_images, seed + 1):
        own = set(scores.img2txt[i])
        order = _top(scores.i2t[i], k)
        hits = [Hit(kept_txt[t], str(texts[kept_txt[t]]), float(scores.i2t[i, t]), t in own) for t in order]
        rank, score = _first_correct(scores.i2t[i], {int(t) for t in own})
        gallery.image_to_text.append(GalleryRow(kept_img[i], str(image_paths[kept_img[i]]), hits, rank, score))
    return gallery


def _first_correct(row: np.ndarray, correct: set[int]) -> tuple[int | None, float | None]:
    """(1-based rank, score) of the best-ranked correct item in the full ranking of `row` (ties as in `_top`)."""
    order = np.argsort(-np.asarray(row, dtype=np.float64), kind="stable")
    for rank, j in enumerate(order, start=1):
        if int(j) in correct:
            return rank, float(row[j])
    return None, None


def _top(row: np.ndarray, k: int) -> list[int]:
    """Indices of the k best scores, best first; ties (the -100 of items outside the re-ranked top k_test)
    keep index order."""
    return [int(j) for j in np.argsort(-np.asarray(row, dtype=np.float64), kind="stable")[:k]]


def _score_text(score: float) -> str:
    return f"{score:.2f}" if score > -100 else "not re-ranked"


def _missed(row: GalleryRow, what: str) -> list[str]:
    """["own image: #37", "score 0.01"] when the correct result is not among the drawn ones, else []."""
    if row.true_rank is None or any(h.correct for h in row.hits):
        return []
    return [f"{what}: #{row.true_rank}", f"score {_score_text(row.true_score)}"]


def render_gallery(gallery: Gallery, load_image: Callable[[str], Image.Image], k: int = 5
                   ) -> tuple[Image.Image, list[Mark]]:
    """The gallery as one RGB image, and the frame of every retrieved item (green = correct)."""
    width = LEFT + k * (TILE + PAD) + PAD
    t2i_row = TILE + 2 * BORDER + LINE_HEIGHT + PAD
    i2t_row = max(TILE + 2 * LINE_HEIGHT + 2 * PAD, k * (LINE_HEIGHT + 8) + PAD)  # rank lines under the image
    height = (3 * PAD + 2 * HEADER + LINE_HEIGHT + len(gallery.text_to_image) * t2i_row
              + len(gallery.image_to_text) * i2t_row)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    marks: list[Mark] = []
    y = PAD
    draw.text((PAD, y), fit(f"{gallery.split}: caption -> top-{k} images (green frame: the caption's own image)",
                            width - 2 * PAD, draw), fill=TEXT, font=font())
    draw.text((PAD, y + LINE_HEIGHT), fit("#rank and score: the evaluation's final score, ITM match logit + ITC "
                                          "similarity (LAVIS's re-ranked score_t2i / score_i2t)", width - 2 * PAD,
                                          draw), fill=MUTED, font=font())
    y += HEADER + LINE_HEIGHT
    for row in gallery.text_to_image:
        lines = wrap(f'"{row.query}"', LEFT - 2 * PAD, draw, max_lines=5)
        for j, line in enumerate(lines):
            draw.text((PAD, y + BORDER + j * LINE_HEIGHT), line, fill=TEXT, font=font())
        missed = ", ".join(_missed(row, "own image"))
        if missed:  # where the caption's own image ranked, below the top k
            draw.text((PAD, y + BORDER + len(lines) * LINE_HEIGHT + 4), fit(missed, LEFT - 2 * PAD, draw),
                      fill=CORRECT, font=font())
        for r, hit in enumerate(row.hits):
            x = LEFT + r * (TILE + PAD)
            box = (x, y, x + TILE + 2 * BORDER - 1, y + TILE + 2 * BORDER - 1)
            canvas.paste(tile(load_image(hit.label), TILE), (x + BORDER, y + BORDER))
            framed(draw, box, CORRECT if hit.correct else WRONG, BORDER)
            marks.append(Mark(box, hit.correct, "image"))
            draw.text((x, y + TILE + 2 * BORDER + 1), f"#{r + 1}  {_score_text(hit.score)}", fill=MUTED, font=font())
        y += t2i_row
    y += PAD
    draw.text((PAD, y), fit(f"{gallery.split}: image -> top-{k} captions (green box: one of the image's own captions)",
                            width - 2 * PAD, draw), fill=TEXT, font=font())
    y += HEADER
    text_x = PAD + TILE + 2 * PAD
    for row in gallery.image_to_text:
        canvas.paste(tile(load_image(row.query), TILE), (PAD, y))
        for j, line in enumerate(_missed(row, "own caption")):  # where its best own caption ranked
            draw.text((PAD, y + TILE + 3 + j * LINE_HEIGHT), fit(line, TILE + PAD, draw), fill=CORRECT, font=font())
        for r, hit in enumerate(row.hits):
            top = y + r * (LINE_HEIGHT + 8)
            box = (text_x, top, width - PAD - 1, top + LINE_HEIGHT + 4)
            if hit.correct:
                draw.rectangle(box, fill=CORRECT_FILL)
            framed(draw, box, CORRECT if hit.correct else WRONG, 2)
            marks.append(Mark(box, hit.correct, "caption"))
            label = f"#{r + 1}  {_score_text(hit.score)}  {hit.label}"
            draw.text((text_x + 6, top + 3), fit(label, box[2] - box[0] - 12, draw), fill=TEXT, font=font())
        y += i2t_row
    return canvas, marks

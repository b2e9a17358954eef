"""Retrieval gallery and query attention grid: the right tiles marked, the right shapes drawn, real files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qformer.evaluate.drawing import CORRECT, WRONG


def _edge_colour(picture: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, int, int]:
    """The colour of a frame, read in the middle of its top edge."""
    x0, y0, x1, _ = box
    return picture.getpixel(((x0 + x1) // 2, y0 + 1))


def _known_scores(n_img: int = 6, per_image: int = 2):
    """Scores where caption t's own image ranks (t % 6)-th and image i's own captions rank 2nd and 7th."""
    from qformer.evaluate.retrieval import ScoreMatrices

    n_txt = n_img * per_image
    txt2img = [t // per_image for t in range(n_txt)]
    img2txt = [[i * per_image + j for j in range(per_image)] for i in range(n_img)]
    t2i = np.full((n_txt, n_img), -100.0, dtype=np.float32)
    for t in range(n_txt):
        others = [i for i in range(n_img) if i != txt2img[t]]
        order = others[: t % n_img] + [txt2img[t]] + others[t % n_img:]  # the own image at rank t % n_img
        t2i[t, order] = np.linspace(1.0, 0.1, n_img)
    i2t = np.full((n_img, n_txt), -100.0, dtype=np.float32)
    for i in range(n_img):
        others = [t for t in range(n_txt) if t not in img2txt[i]]
        order = others[:1] + [img2txt[i][0]] + others[1:6] + [img2txt[i][1]] + others[6:]
        i2t[i, order[:8]] = np.linspace(2.0, 1.3, 8)  # past 8: not re-ranked (-100), as with k_test = 8
    return ScoreMatrices(i2t, t2i, img2txt, txt2img, kept_images=list(range(n_img)), kept_texts=list(range(n_txt)))


def _lavis_recalls(scores: np.ndarray, targets) -> list[float]:
    """R@1/5/10 (percent) of each row's best-placed target in np.argsort's descending order (LAVIS); stable,
    so tied scores (the -100 past k_test) put the higher index first, the rule qformer.evaluate.metrics states."""
    ranks = np.array([min(int(np.flatnonzero(np.argsort(row, kind="stable")[::-1] == t)[0]) for t in targets[r])
                      for r, row in enumerate(scores)])
    return [100.0 * float(np.mean(ranks < k)) for k in (1, 5, 10)]


def _image_files(root: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        path = root / f"img{i}.jpg"
        Image.new("RGB", (80, 60), (40 * i, 255 - 40 * i, 128)).save(path)
        paths.append(str(path))
    return paths


def test_gallery_from_known_scores_marks_the_right_tiles(tmp_path):
    from qformer.evaluate.gallery import build_gallery, fixed_picks, render_gallery

    scores = _known_scores()
    paths = _image_files(tmp_path, 6)
    texts = [f"caption {t} of image {t // 2}" for t in range(12)]
    gallery = build_gallery(scores, texts, paths, split="test", n_captions=4, n_images=3, k=5, seed=0)
    assert gallery.text_to_image[0].query_index == fixed_picks(12, 4, 0)[0]
    assert fixed_picks(12, 4, 0) == fixed_picks(12, 4, 0) != fixed_picks(12, 4, 1)  # seeded: the same every time

    picture, marks = render_gallery(gallery, lambda p: Image.open(p), k=5)
    image_marks = [m for m in marks if m.kind == "image"]
    caption_marks = [m for m in marks if m.kind == "caption"]
    assert len(image_marks) == 4 * 5 and len(caption_marks) == 3 * 5
    for row, row_marks in zip(gallery.text_to_image, np.array_split(image_marks, 4)):
        rank = row.query_index % 6  # where _known_scores put the caption's own image
        assert [m.correct for m in row_marks] == [r == rank for r in range(5)]
        assert [h.index for h in row.hits if h.correct] == ([row.query_index // 2] if rank < 5 else [])
        assert row.true_rank == rank + 1  # where the own image ranked, drawn under the caption when past the top 5
        if rank >= 5:
            left_column = np.asarray(picture.crop((0, row_marks[0].box[1], 240, row_marks[0].box[3])))
            assert (left_column == np.array(CORRECT, np.uint8)).all(axis=-1).any()  # the green rank line
    for row, row_marks in zip(gallery.image_to_text, np.array_split(caption_marks, 3)):
        assert [m.correct for m in row_marks] == [False, True, False, False, False]  # own captions: ranks 2 and 7
        assert row.true_rank == 2
    assert any(h.score == -100.0 for row in gallery.image_to_text for h in row.hits) is False
    for mark in marks:  # the pixels carry the marks
        assert _edge_colour(picture, mark.box) == (CORRECT if mark.correct else WRONG)
    assert picture.size[0] == max(m.box[2] for m in marks) + 1 + 10  # right padding after the last tile


def test_attention_grid_has_one_tile_per_query_and_image():
    from qformer.evaluate.attention_grid import COLS, TILE, render_attention_grid

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (3, 64, 64), dtype=np.uint8) for _ in range(2)]
    maps = rng.random((2, 10, 8, 8)).astype(np.float32)
    maps[0, 3] = 0.0
    maps[0, 3, 2, 5] = 1.0  # query 3 of image 0 looks at one patch only
    picture, tiles = render_attention_grid(images, maps, ["a.jpg", "b.jpg"])
    assert len(tiles) == 2 * (1 + 10)
    assert all(t.box[2] - t.box[0] + 1 == TILE for t in tiles)
    assert sorted(t.query for t in tiles if t.image == 1 and t.query is not None) == list(range(10))
    assert len({t.box[1] for t in tiles if t.image == 0 and t.query is not None}) == -(-10 // COLS)  # rows of maps
    # the hot patch is the brightest place of its tile, where the grid puts patch (2, 5)
    hot = next(t for t in tiles if t.image == 0 and t.query == 3)
    crop = np.asarray(picture.crop((hot.box[0], hot.box[1], hot.box[2] + 1, hot.box[3] + 1)).convert("L"), float)
    y, x = np.unravel_index(np.argmax(crop), crop.shape)
    assert (y * 8 // TILE, x * 8 // TILE) == (2, 5)


def test_visuals_of_a_real_tiny_model_on_the_synthetic_split(synth_data, tiny_bert, tmp_path, progress_log):
    import torch

    from qformer.config import load_config_dict
    from qformer.data.pipeline import build_eval_split
    from qformer.data.synth import coco_caption_section
    from qformer.evaluate.retrieval import evaluate_retrieval_scores
    from qformer.evaluate.visuals import ATTENTION_PNG, GALLERY_JSON, GALLERY_PNG, write_visuals
    from qformer.models import build_model

    cfg = load_config_dict({"model": {"arch": "blip2", "model_type": "tiny", "num_query_token": 8, "max_txt_len": 16,
                                      "bert_model": tiny_bert},
                            "datasets": coco_caption_section(synth_data), "run": {"k_test": 4, "batch_size_eval": 8}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    split = build_eval_split(cfg, "test")
    metrics, scores = evaluate_retrieval_scores(model, split, k_test=4, batch_size=8, device="cpu", label="eval test")
    assert metrics["skipped_images"] == 0
    # the metrics are those of these scores, recomputed the way LAVIS's _report_metrics ranks
    recalls = {"txt": _lavis_recalls(scores.i2t, scores.img2txt),
               "img": _lavis_recalls(scores.t2i, [[i] for i in scores.txt2img])}
    expected = {f"{side}_r{k}": r for side, rs in recalls.items() for k, r in zip((1, 5, 10), rs)}
    expected["r_mean"] = (sum(recalls["txt"]) + sum(recalls["img"])) / 6
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    # not a terminal here: each stage of the evaluation ends with a plain progress line
    done = [line for line in progress_log() if "done in" in line]
    assert [line.split(":")[1].strip() for line in done] == ["encode texts", "encode images", "ITM re-rank"]
    assert done[0].startswith("eval test: encode texts: 80/80 texts (100%)")
    assert done[1].startswith("eval test: encode images: 16/16 images (100%)")

    files = write_visuals(model, split, scores, tmp_path, device="cpu", split_name="test")
    assert sorted(f.name for f in files) == sorted([GALLERY_PNG, GALLERY_JSON, ATTENTION_PNG])
    data = json.loads((tmp_path / GALLERY_JSON).read_text())
    assert len(data["text_to_image"]) == 4 and all(len(r["hits"]) == 5 for r in data["text_to_image"])
    for row in data["text_to_image"]:  # "correct" means the caption's own image
        assert all(h["correct"] == (h["index"] == split.txt2img[row["query_index"]]) for h in row["hits"])
    grid = Image.open(tmp_path / ATTENTION_PNG)
    assert grid.mode == "RGB" and grid.size[0] > 8 * 72  # 8 query maps per row
    assert model.training  # build_model leaves it in train mode, and so do the visuals

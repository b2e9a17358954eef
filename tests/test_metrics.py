"""Recall@K metrics against hand-computed rankings (LAVIS RetrievalTask._report_metrics semantics)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qformer.evaluate.metrics import ground_truth_ranks, retrieval_metrics


def _row_with_target_at(n: int, target: int, position: int) -> np.ndarray:
    """Scores over n candidates whose descending order puts `target` at 0-based `position`."""
    others = [c for c in range(n) if c != target]
    order = others[:position] + [target] + others[position:]
    row = np.empty(n)
    row[order] = np.arange(n, 0, -1, dtype=float)  # first in order gets the highest score
    return row


def test_several_captions_per_image_best_caption_counts():
    # image 0 owns captions 0,1; image 1 owns captions 2,3
    img2txt = [[0, 1], [2, 3]]
    txt2img = [0, 0, 1, 1]
    score_i2t = np.array(
        [
            [0.1, 0.9, 0.5, 0.3],  # order t1,t2,t3,t0 -> caption 1 at rank 0: R@1 hit
            [0.8, 0.7, 0.6, 0.1],  # order t0,t1,t2,t3 -> best own caption (t2) at rank 2: R@5 hit only
        ]
    )
    score_t2i = np.array(
        [
            [0.2, 0.3],  # GT image 0 ranked 1
            [0.9, 0.1],  # GT image 0 ranked 0
            [0.1, 0.8],  # GT image 1 ranked 0
            [0.6, 0.2],  # GT image 1 ranked 1
        ]
    )
    m = retrieval_metrics(score_i2t, score_t2i, img2txt, txt2img)
    assert m["txt_r1"] == pytest.approx(50.0)
    assert m["txt_r5"] == pytest.approx(100.0)
    assert m["txt_r10"] == pytest.approx(100.0)
    assert m["img_r1"] == pytest.approx(50.0)
    assert m["img_r5"] == m["img_r10"] == pytest.approx(100.0)
    assert m["txt_r_mean"] == pytest.approx(250.0 / 3)
    assert m["img_r_mean"] == pytest.approx(250.0 / 3)
    np.testing.assert_array_equal(ground_truth_ranks(score_i2t, img2txt), [0, 2])


def test_recall_cutoffs_and_agg_is_txt_r_mean_not_r_mean():
    n = 12
    i2t_pos = [0, 0, 0, 3, 3, 7, 7, 7, 11, 11, 0, 0]  # ranks of each image's only caption
    t2i_pos = [4] * n
    score_i2t = np.stack([_row_with_target_at(n, i, p) for i, p in enumerate(i2t_pos)])
    score_t2i = np.stack([_row_with_target_at(n, t, p) for t, p in enumerate(t2i_pos)])
    m = retrieval_metrics(score_i2t, score_t2i, [[i] for i in range(n)], list(range(n)))
    assert m["txt_r1"] == pytest.approx(100 * 5 / 12)
    assert m["txt_r5"] == pytest.approx(100 * 7 / 12)
    assert m["txt_r10"] == pytest.approx(100 * 10 / 12)
    assert m["img_r1"] == pytest.approx(0.0)
    assert m["img_r5"] == m["img_r10"] == pytest.approx(100.0)
    txt_mean = 100 * (5 + 7 + 10) / 36
    assert m["txt_r_mean"] == pytest.approx(txt_mean)
    assert m["img_r_mean"] == pytest.approx(200 / 3)
    assert m["r_mean"] == pytest.approx((txt_mean + 200 / 3) / 2)
    assert m["agg_metrics"] == pytest.approx(txt_mean)
    assert m["agg_metrics"] != pytest.approx(m["r_mean"])


def test_ties_rank_higher_index_first():
    # t2i row: all candidates tie (as the -100 fill outside the re-ranked top-k does)
    score_t2i = np.full((3, 6), -100.0)
    txt2img = [0, 5, 2]  # tie rule: rank = number of tied candidates with a larger index
    ranks = ground_truth_ranks(score_t2i, [[i] for i in txt2img])
    np.testing.assert_array_equal(ranks, [5, 0, 3])
    # partial tie: GT ties with one higher-index candidate above everyone else
    row = np.array([[0.0, 0.7, 0.7, 0.1, 0.7]])
    np.testing.assert_array_equal(ground_truth_ranks(row, [[1]]), [2])
    np.testing.assert_array_equal(ground_truth_ranks(row, [[4]]), [0])
    np.testing.assert_array_equal(ground_truth_ranks(row, [[3]]), [3])


def test_tie_rule_equals_reversed_stable_argsort_on_random_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(40, 30)).astype(np.float32)  # heavy ties
    targets = [list(rng.choice(30, size=rng.integers(1, 4), replace=False)) for _ in range(40)]
    expected = []
    for row, tg in zip(scores, targets):
        order = np.argsort(row, kind="stable")[::-1]  # LAVIS's ranking, made deterministic
        expected.append(min(int(np.where(order == t)[0][0]) for t in tg))
    np.testing.assert_array_equal(ground_truth_ranks(scores, targets), expected)


def test_one_image():
    score_i2t = np.array([[0.3, 0.1, 0.2]])
    score_t2i = np.array([[0.5], [-1.0], [-100.0]])
    m = retrieval_metrics(score_i2t, score_t2i, {0: [0, 1, 2]}, {0: 0, 1: 0, 2: 0})
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "agg_metrics"):
        assert m[key] == pytest.approx(100.0)


def test_image_without_captions_is_a_miss():
    m = retrieval_metrics(np.array([[1.0], [0.0]]), np.array([[1.0, 0.0]]), [[0], []], [0])
    assert m["txt_r10"] == pytest.approx(50.0)


def test_accepts_torch_tensors():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = retrieval_metrics(s, s.t(), [[0], [1]], [0, 1])
    assert m["r_mean"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "i2t, t2i, img2txt, txt2img, match",
    [
        (np.zeros((2, 3)), np.zeros((3, 2)), [[0], [1]], [0, 1], "score_i2t has shape"),
        (np.zeros((2, 2)), np.zeros((2, 3)), [[0], [1]], [0, 1], "score_t2i has shape"),
        (np.zeros((2, 2)), np.zeros((2, 2)), [[0], [5]], [0, 1], r"img2txt\[1\]"),
        (np.zeros((2, 2)), np.zeros((2, 2)), [[0], [1]], [0, 2], r"txt2img\[1\]"),
        (np.array([[np.nan, 0.0], [0.0, 0.0]]), np.zeros((2, 2)), [[0], [1]], [0, 1], "score_i2t has 1 NaN"),
    ],
)
def test_bad_input_errors(i2t, t2i, img2txt, txt2img, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(i2t, t2i, img2txt, txt2img)

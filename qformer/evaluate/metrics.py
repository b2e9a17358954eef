"""Recall@K retrieval metrics exactly as LAVIS's `RetrievalTask._report_metrics` computes them (spec §6.1).

Ranking rule. LAVIS ranks each row with `np.argsort(score)[::-1]` and takes the position of the ground
truth in that order. We compute the same position in closed form, from the reversal of a *stable*
ascending sort:

    rank(c) = #{j : s_j > s_c} + #{j : s_j == s_c and j > c}

i.e. among tied scores the candidate with the HIGHER index is ranked first. LAVIS's default
`argsort` kind ("quicksort", an introsort, SIMD-accelerated in NumPy 2) is not stable, so on large rows
its tie order is unspecified; for small rows (insertion sort) it matches ours. Ties matter in practice:
every candidate outside the ITM re-ranked top `k_test` holds the same score (-100), so a ground truth
that missed the top-k ties with all of them and its rank among them follows this rule. With
`k_test >= 10` this cannot change any R@1/5/10.

i2t: an image's rank is the best rank over all of its captions; an image with no caption counts as a
miss (LAVIS leaves its rank at 1e20). t2i: the rank of the one ground-truth image.
`agg_metrics` is `txt_r_mean` (NOT `r_mean`): that is what LAVIS's runner uses to pick its best
checkpoint. Our training loop selects on `run.best_metric` (default r_mean) instead.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

RECALL_KS = (1, 5, 10)
_CHUNK_ELEMENTS = 1 << 22  # score entries compared at once (bounds temporary memory)


def ground_truth_ranks(scores: np.ndarray, targets: Sequence[Sequence[int]]) -> np.ndarray:
    """0-based rank of the best-ranked target of each row (float; np.inf for a row without targets)."""
    scores = np.asarray(scores)
    n_rows, n_cand = scores.shape
    cand_idx = np.arange(n_cand)
    # every (row, target) pair; ranked in chunks so the [pairs, candidates] temporaries stay small
    rows = np.asarray([r for r in range(n_rows) for _ in targets[r]], dtype=np.int64)
    cols = np.asarray([int(c) for r in range(n_rows) for c in targets[r]], dtype=np.int64)
    ranks = np.full(n_rows, np.inf)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_cand))
    for lo in range(0, len(rows), chunk):
        r, c = rows[lo : lo + chunk], cols[lo : lo + chunk]
        row_scores = scores[r]  # [P, n_cand]
        own = row_scores[np.arange(len(r)), c][:, None]
        pair_rank = (row_scores > own).sum(1) + ((row_scores == own) & (cand_idx[None, :] > c[:, None])).sum(1)
        np.minimum.at(ranks, r, pair_rank.astype(float))
    return ranks


def _recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": 100.0 * float(np.count_nonzero(ranks < k)) / len(ranks) for k in RECALL_KS}
    out[f"{prefix}_r_mean"] = sum(out[f"{prefix}_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    return out


def _check(score_i2t: np.ndarray, score_t2i: np.ndarray, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]) -> None:
    n_img, n_txt = len(img2txt), len(txt2img)
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"retrieval metrics need at least one image and one text (got {n_img} images, {n_txt} texts)")
    if score_i2t.shape != (n_img, n_txt):
        raise ValueError(f"score_i2t has shape {score_i2t.shape}, expected (len(img2txt), len(txt2img)) = {(n_img, n_txt)}")
    if score_t2i.shape != (n_txt, n_img):
        raise ValueError(f"score_t2i has shape {score_t2i.shape}, expected (len(txt2img), len(img2txt)) = {(n_txt, n_img)}")
    for name, mat in (("score_i2t", score_i2t), ("score_t2i", score_t2i)):
        bad = int(np.isnan(mat).sum())
        if bad:  # argsort would silently rank NaN first, i.e. report a broken model as perfect
            raise ValueError(f"{name} has {bad} NaN entries; the evaluated model produced non-finite scores")
    for i, caps in enumerate(img2txt):
        for t in caps:
            if not 0 <= int(t) < n_txt:
                raise ValueError(f"img2txt[{i}] refers to text {t}, outside [0, {n_txt})")
    for t, i in enumerate(txt2img):
        if not 0 <= int(i) < n_img:
            raise ValueError(f"txt2img[{t}] refers to image {i}, outside [0, {n_img})")


def retrieval_metrics(
    score_i2t: np.ndarray,
    score_t2i: np.ndarray,
    img2txt: Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
    txt2img: Sequence[int] | Mapping[int, int],
) -> dict[str, float]:
    """txt_r1/5/10, img_r1/5/10 (percent), their means, r_mean and agg_metrics (= txt_r_mean, as LAVIS).

    score_i2t: [N_img, N_txt], score_t2i: [N_txt, N_img] (numpy or torch); img2txt[i] = caption indices
    of image i; txt2img[t] = image index of caption t (lists or LAVIS-style int-keyed dicts).
    """
    score_i2t = _as_numpy(score_i2t)
    score_t2i = _as_numpy(score_t2i)
    img2txt = _as_list(img2txt)
    txt2img = [int(i) for i in _as_list(txt2img)]
    _check(score_i2t, score_t2i, img2txt, txt2img)
    metrics = _recalls(ground_truth_ranks(score_i2t, img2txt), "txt")
    metrics.update(_recalls(ground_truth_ranks(score_t2i, [[i] for i in txt2img]), "img"))
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    metrics["agg_metrics"] = metrics["txt_r_mean"]
    return metrics


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"a score matrix must be 2-D, got shape {arr.shape}")
    return arr


def _as_list(x):
    if isinstance(x, Mapping):  # LAVIS keeps img2txt/txt2img as dicts keyed 0..N-1
        keys = sorted(x)
        if keys != list(range(len(keys))):
            raise ValueError("img2txt/txt2img dict keys must be 0..N-1")
        return [x[k] for k in keys]
    return list(x)

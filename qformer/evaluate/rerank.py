"""Coarse ITC similarity and ITM re-ranking of the top `k_test` candidates (LAVIS `compute_sim_matrix`, spec §6.2).

Model-free on purpose: the ITM model enters only as a scoring callable, so the re-rank logic is testable
with any scorer and the same code serves one process or one shard of a distributed evaluation.

Semantics (LAVIS): for each image, its top-k texts by coarse similarity get score = ITM + sim (i2t);
for each text, its top-k images likewise (t2i); every other entry is -100. `k` is clamped to the number of
candidates (LAVIS's `topk` would raise instead). A pair that is in both an image's and a text's top-k is
scored once and used for both matrices (LAVIS scores it twice; the value is the same).

Work split: a shard owns a contiguous range of images and computes every pair whose IMAGE it owns, in both
directions. So each shard needs the frozen-ViT features of its own images only, never the whole set
(LAVIS instead keeps all ViT features on every rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

# (image indices [n], text indices [n]) -> ITM positive-class logit averaged over queries [n]
ItmScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NOT_RANKED = -100.0  # LAVIS's fill value for pairs outside the re-ranked top-k


def coarse_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """sims[i, t] = max over queries q of image_feats[i, q] . text_feats[t]; raw cosine, no temperature.

    image_feats: [N_img, Q, E], text_feats: [N_txt, E] (both L2-normalised) -> [N_img, N_txt].
    Chunked over images so the [chunk, Q, N_txt] intermediate stays bounded.
    """
    if image_feats.ndim != 3 or text_feats.ndim != 2 or image_feats.shape[-1] != text_feats.shape[-1]:
        raise ValueError(f"expected image_feats [N,Q,E] and text_feats [T,E], got {tuple(image_feats.shape)} and {tuple(text_feats.shape)}")
    rows = [
        torch.einsum("iqe,te->iqt", image_feats[lo : lo + chunk], text_feats).amax(dim=1)
        for lo in range(0, image_feats.shape[0], chunk)
    ]
    return torch.cat(rows, dim=0) if rows else image_feats.new_zeros((0, text_feats.shape[0]))


@dataclass
class RerankEntries:
    """Sparse re-ranked scores of one shard: rows/cols/values of the i2t and t2i matrices (CPU tensors)."""

    i2t_rows: torch.Tensor
    i2t_cols: torch.Tensor
    i2t_values: torch.Tensor
    t2i_rows: torch.Tensor
    t2i_cols: torch.Tensor
    t2i_values: torch.Tensor

    @staticmethod
    def concat(parts: Sequence["RerankEntries"]) -> "RerankEntries":
        fields = RerankEntries.__dataclass_fields__
        return RerankEntries(**{f: torch.cat([getattr(p, f) for p in parts]) for f in fields})

    def to_dense(self, n_img: int, n_txt: int, fill: float = NOT_RANKED) -> tuple[np.ndarray, np.ndarray]:
        """score_i2t [N_img, N_txt] and score_t2i [N_txt, N_img] as float32 numpy, `fill` where not re-ranked."""
        i2t = np.full((n_img, n_txt), fill, dtype=np.float32)
        t2i = np.full((n_txt, n_img), fill, dtype=np.float32)
        i2t[self.i2t_rows.numpy(), self.i2t_cols.numpy()] = self.i2t_values.numpy()
        t2i[self.t2i_rows.numpy(), self.t2i_cols.numpy()] = self.t2i_values.numpy()
        return i2t, t2i


def itm_rerank(
    sims: torch.Tensor,
    k_test: int,
    itm_scorer: ItmScorer,
    *,
    owned_images: range | None = None,
    batch_size: int = 128,
    progress: Callable[[int], Any] | None = None,
) -> RerankEntries:
    """ITM-re-rank the pairs whose image lies in `owned_images` (default: all), both directions.

    sims: coarse similarities [N_img, N_txt] (all images and texts, as every shard sees them).
    The scorer gets pairs sorted by image, in batches of at most `batch_size`.
    `progress(total_pairs)`: makes a qformer.core.progress.Progress-like object, updated per scored batch.
    """
    if k_test < 1:
        raise ValueError(f"run.k_test must be >= 1, got {k_test}")
    n_img, n_txt = sims.shape
    owned = owned_images if owned_images is not None else range(n_img)
    if owned.step != 1 or owned.start < 0 or owned.stop > n_img:
        raise ValueError(f"owned_images must be a contiguous range inside [0, {n_img}), got {owned}")
    device = sims.device

    # i2t: each owned image's top-k texts
    k_txt = min(k_test, n_txt)
    own_sims = sims[owned.start : owned.stop]
    txt_top = own_sims.topk(k_txt, dim=1).indices  # [n_own, k]
    i2t_img = torch.arange(owned.start, owned.stop, device=device).repeat_interleave(k_txt)
    i2t_txt = txt_top.reshape(-1)

    # t2i: each text's top-k images, keeping only the owned ones
    k_img = min(k_test, n_img)
    img_top = sims.t().topk(k_img, dim=1).indices  # [n_txt, k]
    t2i_txt = torch.arange(n_txt, device=device).repeat_interleave(k_img)
    t2i_img = img_top.reshape(-1)
    mine = (t2i_img >= owned.start) & (t2i_img < owned.stop)
    t2i_txt, t2i_img = t2i_txt[mine], t2i_img[mine]

    # score each distinct (image, text) pair once; sorted keys group a batch's pairs by image
    keys_i2t = i2t_img * n_txt + i2t_txt
    keys_t2i = t2i_img * n_txt + t2i_txt
    keys, inverse = torch.unique(torch.cat([keys_i2t, keys_t2i]), sorted=True, return_inverse=True)
    itm = torch.empty(keys.shape[0], dtype=torch.float32, device=device)
    bar = progress(int(keys.shape[0])) if progress is not None else None
    for lo in range(0, keys.shape[0], batch_size):
        k = keys[lo : lo + batch_size]
        out = itm_scorer(k // n_txt, k % n_txt)
        if out.shape != k.shape:
            raise ValueError(f"ITM scorer returned shape {tuple(out.shape)} for {k.shape[0]} pairs")
        itm[lo : lo + batch_size] = out.float()
        if bar is not None:
            bar.update(int(k.shape[0]))
    if bar is not None:
        bar.close()
    itm_i2t, itm_t2i = itm[inverse[: keys_i2t.shape[0]]], itm[inverse[keys_i2t.shape[0] :]]

    cpu = torch.device("cpu")
    return RerankEntries(
        i2t_rows=i2t_img.to(cpu),
        i2t_cols=i2t_txt.to(cpu),
        i2t_values=(itm_i2t + sims[i2t_img, i2t_txt].float()).to(cpu),
        t2i_rows=t2i_txt.to(cpu),
        t2i_cols=t2i_img.to(cpu),
        t2i_values=(itm_t2i + sims[t2i_img, t2i_txt].float()).to(cpu),
    )


def rerank_scores(sims: torch.Tensor, k_test: int, itm_scorer: ItmScorer, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Single-process convenience: dense (score_i2t, score_t2i) for all images."""
    entries = itm_rerank(sims, k_test, itm_scorer, batch_size=batch_size)
    return entries.to_dense(*sims.shape)

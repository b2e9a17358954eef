"""ITM re-ranking core (model-free): constructed cases where ITM must change the coarse ranking."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qformer.evaluate.metrics import retrieval_metrics
from qformer.evaluate.rerank import NOT_RANKED, RerankEntries, coarse_similarity, itm_rerank, rerank_scores

N = 3
IDENT = [[i] for i in range(N)], list(range(N))


def _shifted_sims() -> torch.Tensor:
    """Coarse sims that prefer the WRONG partner: image i is closest to text (i+1) % N, then to text i."""
    sims = torch.full((N, N), 0.1)
    for i in range(N):
        sims[i, (i + 1) % N] = 0.9
        sims[i, i] = 0.5
    return sims


def _matching_scorer(calls: list | None = None):
    """ITM that knows the truth: +5 for image i with text i, -5 otherwise."""

    def score(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append((img.clone(), txt.clone()))
        return torch.where(img == txt, 5.0, -5.0)

    return score


def test_coarse_similarity_is_max_over_queries_without_temperature():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 4, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=-1)
    sims = coarse_similarity(img, txt, chunk=2)
    expected = torch.stack([torch.stack([(img[i] @ txt[t]).max() for t in range(7)]) for i in range(5)])
    torch.testing.assert_close(sims, expected)
    assert sims.abs().max() <= 1.0 + 1e-6  # cosine range: no 1/temp scaling


def test_itm_rerank_fixes_a_wrong_coarse_ranking():
    sims = _shifted_sims()
    coarse = retrieval_metrics(sims, sims.t(), *IDENT)
    assert coarse["txt_r1"] == 0.0 and coarse["img_r1"] == 0.0

    i2t, t2i = rerank_scores(sims, k_test=2, itm_scorer=_matching_scorer())
    for i in range(N):
        assert i2t[i, i] == pytest.approx(5.5)  # ITM + sim for the true pair
        assert i2t[i, (i + 1) % N] == pytest.approx(-4.1)
        assert t2i[i, i] == pytest.approx(5.5)
        assert t2i[i, (i - 1) % N] == pytest.approx(-4.1)
    # exactly k_test entries per row were re-ranked; the rest carry LAVIS's -100
    assert ((i2t == NOT_RANKED).sum(1) == N - 2).all() and ((t2i == NOT_RANKED).sum(1) == N - 2).all()
    m = retrieval_metrics(i2t, t2i, *IDENT)
    assert m["txt_r1"] == m["img_r1"] == 100.0


def test_ground_truth_outside_top_k_cannot_be_rescued():
    sims = _shifted_sims()
    i2t, t2i = rerank_scores(sims, k_test=1, itm_scorer=_matching_scorer())
    for i in range(N):  # only the wrong partner was re-ranked; the truth stays at -100
        assert i2t[i, i] == NOT_RANKED and i2t[i, (i + 1) % N] == pytest.approx(-4.1)
    assert retrieval_metrics(i2t, t2i, *IDENT)["txt_r1"] == 0.0


def test_k_test_larger_than_candidates_ranks_everything():
    sims = _shifted_sims()
    calls: list = []
    i2t, t2i = rerank_scores(sims, k_test=128, itm_scorer=_matching_scorer(calls), batch_size=4)
    assert not (i2t == NOT_RANKED).any() and not (t2i == NOT_RANKED).any()
    np.testing.assert_allclose(i2t, t2i.T)  # every pair scored, same value both ways
    pairs = torch.cat([torch.stack(c, 1) for c in calls])
    assert len(pairs) == N * N  # a pair in both top-k lists is scored once
    assert len({tuple(p.tolist()) for p in pairs}) == N * N
    assert all(len(c[0]) <= 4 for c in calls)
    assert torch.equal(pairs[:, 0], pairs[:, 0].sort().values)  # grouped by image


def test_itm_can_demote_a_coarse_winner():
    sims = torch.tensor([[0.9, 0.8], [0.1, 0.2]])

    def scorer(img, txt):  # ITM dislikes (0, 0): -1 + 0.9 < +0.5 + 0.8
        return torch.where((img == 0) & (txt == 0), -1.0, 0.5)

    i2t, _ = rerank_scores(sims, k_test=2, itm_scorer=scorer)
    assert i2t[0].argmax() == 1
    np.testing.assert_allclose(i2t[0], [-0.1, 1.3], rtol=1e-6)


def test_shards_by_image_reassemble_the_single_process_result():
    g = torch.Generator().manual_seed(1)
    sims = torch.rand(7, 11, generator=g)
    w = torch.randn(7, 11, generator=g)

    def scorer(img, txt):
        return w[img, txt]

    whole = itm_rerank(sims, 3, scorer).to_dense(7, 11)
    parts = [itm_rerank(sims, 3, scorer, owned_images=r) for r in (range(0, 3), range(3, 3), range(3, 7))]
    sharded = RerankEntries.concat(parts).to_dense(7, 11)
    np.testing.assert_array_equal(whole[0], sharded[0])
    np.testing.assert_array_equal(whole[1], sharded[1])


def test_bad_arguments():
    sims = _shifted_sims()
    with pytest.raises(ValueError, match="k_test"):
        itm_rerank(sims, 0, _matching_scorer())
    with pytest.raises(ValueError, match="owned_images"):
        itm_rerank(sims, 1, _matching_scorer(), owned_images=range(2, 5))
    with pytest.raises(ValueError, match="shape"):
        itm_rerank(sims, 1, lambda i, t: torch.zeros(1))

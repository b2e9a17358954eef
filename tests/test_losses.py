"""Single-process maths of the ITC / ITM / LM losses (spec §4.2-§4.4)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qformer.models.losses import ITCLoss, ITMLoss, LMLoss, lm_inputs


def test_itc_is_max_over_queries_with_temperature_and_label_smoothing():
    img = F.normalize(torch.randn(3, 4, 8), dim=-1)
    txt = F.normalize(torch.randn(3, 8), dim=-1)
    temp = torch.tensor(0.05)
    out = ITCLoss()(img, txt, temp)
    sim = torch.stack([torch.stack([(img[i] @ txt[j]).max() for j in range(3)]) for i in range(3)]) / temp
    assert torch.allclose(out.sim_i2t, sim, atol=1e-6) and torch.allclose(out.sim_t2i, sim.T, atol=1e-6)

    def smoothed_ce(logits):  # (1-eps)*onehot + eps/C, by hand
        logp = logits.log_softmax(1)
        target = torch.full_like(logp, 0.1 / 3) + 0.9 * torch.eye(3)
        return -(target * logp).sum(1).mean()

    assert torch.allclose(out.loss, 0.5 * (smoothed_ce(sim) + smoothed_ce(sim.T)), atol=1e-6)


def test_itc_targets_are_offset_by_rank():
    img = F.normalize(torch.randn(2, 3, 8), dim=-1)
    txt = F.normalize(torch.randn(2, 8), dim=-1)
    a = ITCLoss(rank=0, world_size=1)(img, txt, torch.tensor(0.07)).loss
    # explicit rank 1 in a 1-process "world": targets 2,3 lie outside the 2 columns -> CE errors
    with pytest.raises((IndexError, RuntimeError)):
        ITCLoss(rank=1, world_size=1)(img, txt, torch.tensor(0.07))
    assert torch.isfinite(a)


def test_head_negatives_never_pick_the_positive_and_follow_softmax():
    sim = torch.tensor([[5.0, 4.0, -3.0], [0.0, 9.0, 1.0], [2.0, 2.0, 2.0]])
    w = ITMLoss(negatives="head").negative_weights(sim, rank=0)
    assert torch.all(w.diagonal() < 1e-30)
    expected = F.softmax(torch.tensor([-10000.0, 4.0, -3.0]), 0)
    assert torch.allclose(w[0], expected)
    torch.manual_seed(0)
    picks = torch.stack([ITMLoss().sampler(w) for _ in range(200)])
    assert not (picks == torch.arange(3)).any()


def test_diverged_similarities_draw_uniform_negatives_instead_of_raising():
    from qformer.models.losses import multinomial_negatives

    sim = torch.tensor([[5.0, 4.0, -3.0], [float("nan"), 1.0, 0.0], [float("inf"), 2.0, 2.0]])
    w = ITMLoss(negatives="head").negative_weights(sim, rank=0)
    torch.manual_seed(0)
    picks = torch.stack([multinomial_negatives(w) for _ in range(300)])
    assert not (picks[:, 0] == 0).any()  # a finite row keeps its distribution (never the positive)
    for row in (1, 2):  # rows that are not distributions: uniform, every column drawn
        assert set(picks[:, row].tolist()) == {0, 1, 2}


def test_release_negatives_add_floor_then_zero_positive():
    sim = torch.randn(2, 4)  # rank 1 of 2, B=2: own positives at columns 2 and 3
    w = ITMLoss(negatives="release").negative_weights(sim, rank=1)
    assert w[0, 2] == 0 and w[1, 3] == 0
    assert torch.allclose(w[0, :2], F.softmax(sim[0], 0)[:2] + 1e-4)
    with pytest.raises(ValueError, match="itm_negatives"):
        ITMLoss(negatives="bogus")


def test_itm_pair_layout_and_labels():
    seen = {}

    def fake_logits(images, ids, atts):
        seen.update(images=images, ids=ids)
        return torch.zeros(images.shape[0], 2, requires_grad=True)

    emb = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 2)
    ids = torch.arange(3).view(3, 1).expand(3, 4)
    sim = torch.tensor([[0.0, 5.0, -5.0], [-5.0, 0.0, 5.0], [5.0, -5.0, 0.0]])
    loss = ITMLoss(sampler=lambda w: w.argmax(1))(fake_logits, emb, ids, torch.ones(3, 4), sim, sim)
    assert torch.isclose(loss, torch.tensor(math.log(2.0)))  # zero logits -> CE = log 2
    img_ids = seen["images"][:, 0, 0].long().tolist()
    txt_ids = seen["ids"][:, 0].tolist()
    assert img_ids == [0, 1, 2, 1, 2, 0, 0, 1, 2]  # [pos; neg image per text; pos]
    assert txt_ids == [0, 1, 2, 0, 1, 2, 1, 2, 0]  # [pos; pos; neg text per image]


def test_lm_inputs_replace_cls_with_dec_and_mask_pads():
    ids = torch.tensor([[101, 7, 8, 102, 0, 0]])
    dec, labels = lm_inputs(ids, bos_token_id=30522, pad_token_id=0)
    assert dec.tolist() == [[30522, 7, 8, 102, 0, 0]]
    assert labels.tolist() == [[30522, 7, 8, 102, -100, -100]]
    assert ids[0, 0] == 101  # input not modified


def test_lm_loss_shifts_by_one_with_label_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[3, 4, 5, -100, -100], [1, 2, 3, 4, 5]])
    got = LMLoss()(logits, labels)
    rows, cols = [], []
    for b in range(2):
        for t in range(4):
            if labels[b, t + 1] != -100:
                rows.append(logits[b, t])
                cols.append(labels[b, t + 1])
    logp = torch.stack(rows).log_softmax(-1)
    target = torch.full_like(logp, 0.1 / 11)
    target[torch.arange(len(cols)), torch.stack(cols)] += 0.9
    assert torch.allclose(got, -(target * logp).sum(-1).mean(), atol=1e-6)

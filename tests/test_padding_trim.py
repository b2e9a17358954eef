"""Trailing padding columns are dropped before the local Q-Former passes: every output that is used
(text [CLS] features, ITM logits, the three losses) is unchanged, only the wasted work goes."""
from __future__ import annotations

import pytest
import torch
from helpers import small_model

import qformer.models.blip2_qformer as blip2

CAPTIONS = ["a red circle", "a small blue square at the top left on a white background", "green", "a big triangle"]


@pytest.fixture(scope="module")
def model(tiny_bert):
    return small_model(tiny_bert, max_txt_len=32)  # eval: dropout off, both paths see the same network


def test_trim_padding_keeps_the_used_prefix(model):
    ids, atts = model.tokenize(CAPTIONS, 32)
    trimmed_ids, trimmed_atts = blip2.trim_padding(ids, atts)
    width = int(atts.sum(1).max())
    assert trimmed_ids.shape == (4, width) < ids.shape and torch.equal(trimmed_ids, ids[:, :width])
    assert atts[:, width:].sum() == 0 and torch.equal(trimmed_atts, atts[:, :width])
    full = torch.ones(2, 5, dtype=torch.long)
    assert blip2.trim_padding(full, full)[1].shape == (2, 5)  # nothing to drop


def test_outputs_and_losses_equal_the_full_width_computation(model, monkeypatch):
    ids, atts = model.tokenize(CAPTIONS, 32)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        feats_trimmed = model.encode_text(ids, atts)
        itm_trimmed = model.itm_logits(model.encode_image(images)[1], ids, atts)
        torch.manual_seed(1)
        out_trimmed = model({"image": images, "text_ids": ids, "text_atts": atts})
        monkeypatch.setattr(blip2, "trim_padding", lambda i, a, width=None: (i, a))  # LAVIS: full max_length width
        feats_full = model.encode_text(ids, atts)
        itm_full = model.itm_logits(model.encode_image(images)[1], ids, atts)
        torch.manual_seed(1)
        out_full = model({"image": images, "text_ids": ids, "text_atts": atts})
    assert torch.allclose(feats_trimmed, feats_full, atol=1e-5)
    assert torch.allclose(itm_trimmed, itm_full, atol=1e-5)
    for key in ("loss_itc", "loss_itm", "loss_lm", "loss"):
        assert getattr(out_trimmed, key).item() == pytest.approx(getattr(out_full, key).item(), abs=1e-5), key

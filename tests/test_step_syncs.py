"""The training forward/backward reads nothing back from the device once the host-side text plan is
given (issue 9: no host-device syncs in the hot loop), as qformer.train.sync_check records on CPU."""
from __future__ import annotations

import pytest
import torch
from helpers import small_model

from qformer.train.step import with_text_plan
from qformer.train.sync_check import SyncRecorder

@pytest.fixture(scope="module")
def model(tiny_bert):
    return small_model(tiny_bert)  # eval: dropout off, the two runs below see the same network


@pytest.fixture()
def batch(model):
    ids, atts = model.tokenize(["a red circle", "a small blue square on the left", "green", "a big triangle"], 16)
    return {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
            "text_ids": ids, "text_atts": atts}


def _losses(model, samples, recorder):
    torch.manual_seed(1)  # same ITM negatives in both runs
    with recorder:
        out = model(samples)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return {k: getattr(out, k).detach() for k in ("loss_itc", "loss_itm", "loss_lm")}


def test_forward_and_backward_read_nothing_back_with_the_text_plan(model, batch):
    planned = with_text_plan(batch, model)
    assert planned["text_width"] == int(batch["text_atts"].sum(1).max()) < 16
    with_plan, without_plan = SyncRecorder(), SyncRecorder()
    losses_plan = _losses(model, planned, with_plan)
    losses_device = _losses(model, batch, without_plan)
    assert with_plan.seen == []
    assert without_plan.seen  # the recorder sees the syncs the plan removes (trim width, LM mask)
    for key in losses_plan:  # and the plan changes nothing
        assert torch.allclose(losses_plan[key], losses_device[key], atol=1e-6), key


def test_text_plan_matches_the_lm_labels(model, batch):
    plan = model.text_plan(batch["text_ids"], batch["text_atts"])
    width = plan["text_width"]
    labels = batch["text_ids"][:, 1:width]
    expected = (labels != model.tokenizer.pad_token_id).reshape(-1).nonzero().squeeze(1)
    assert torch.equal(plan["lm_index"], expected)
    assert len(plan["lm_index"]) == int(batch["text_atts"][:, 1:].sum())  # every non-pad next token, once
    on_device = with_text_plan({"text_ids": batch["text_ids"].to("meta"), "text_atts": batch["text_atts"]}, model)
    assert "text_width" not in on_device  # only planned from host tensors

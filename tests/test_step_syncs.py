"""The training forward/backward reads nothing back from the device once the host-side text plan is
given (issue 9: no host-device syncs in the hot loop), as qformer.train.sync_check records on CPU."""
from __future__ import annotations

import pytest
import torch
from helpers import small_model

from qformer.train.step import prepare_samples, with_text_plan
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


def test_moving_and_normalising_a_batch_makes_no_tensor_from_host_data_after_the_first(model, batch):
    """CLIP's mean/std tables are made once per device (on a GPU each is a blocking host->device copy)."""
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.9, 0.8, 0.7)  # a processor's own values: not cached by any other test
    first, second = SyncRecorder(), SyncRecorder()
    with first:
        a = prepare_samples({**batch, "image": images}, torch.device("cpu"), mean, std)
    with second:
        b = prepare_samples({**batch, "image": images}, torch.device("cpu"), mean, std)
    assert first.seen == ["aten.lift_fresh.default"] * 2  # the two tables, once
    assert second.seen == []
    assert torch.equal(a["image"], b["image"])
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(a["image"], expected)


def _two_rank_forward(rank: int, init_file: str, bert: str, out_dir: str) -> None:
    """Rank 1's captions are wider than rank 0's: rank 0's ITM pass must take rank 1's width for its negatives."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = small_model(bert)
        captions = ["red", "blue", "green", "a dot"] if rank == 0 else [
            "a small blue square on the left", "a big red circle in the middle", "green", "a triangle"]
        ids, atts = model.tokenize(captions, 16)
        batch = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(rank)),
                 "text_ids": ids, "text_atts": atts}
        planned = with_text_plan(batch, model)  # host side, before the region (as train_step does)
        recorder = SyncRecorder()
        torch.save({"seen": recorder.seen, "width": planned["text_width"], "itm_width": planned["itm_text_width"],
                    "planned": _losses(model, planned, recorder), "counted": _losses(model, batch, SyncRecorder())},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_plan_the_itm_width_on_the_host(tiny_bert, tmp_path):
    """With several ranks the ITM negatives come from every rank: the widest rank's width is agreed on the
    host (a CPU collective of one integer), so the forward still reads nothing back from the device, and the
    losses equal those of the width counted on the device."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_forward, args=(str(tmp_path / "pg"), tiny_bert, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["width"] < ranks[1]["width"] == ranks[0]["itm_width"] == ranks[1]["itm_width"]
    for got in ranks:
        assert got["seen"] == []
        for key in ("loss_itc", "loss_itm", "loss_lm"):
            assert torch.allclose(got["planned"][key], got["counted"][key], atol=1e-6), key


def test_ddp_as_the_workers_wrap_it_keeps_one_copy_of_the_gradients_and_broadcasts_no_buffers(tiny_bert, tmp_path,
                                                                                             monkeypatch):
    """qformer.train.ddp.ddp_options (Ray Train's prepare_model and the device check): gradients live in DDP's
    all-reduce buckets (a handful of storages, not one per parameter beside the buckets), and a forward
    broadcasts nothing (DDP's default re-sends every buffer from rank 0 before each forward)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from qformer.train.ddp import ddp_options

    broadcasts = []
    real = DistributedDataParallel._distributed_broadcast_coalesced
    monkeypatch.setattr(DistributedDataParallel, "_distributed_broadcast_coalesced",
                        lambda self, *a, **k: broadcasts.append(1) or real(self, *a, **k))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        storages = {}
        for name, options in (("default", {}), ("ours", ddp_options())):
            wrapped = DistributedDataParallel(small_model(tiny_bert).train(), **options)
            ids, atts = wrapped.module.tokenize(["a red circle", "a blue square"], 16)
            broadcasts.clear()
            loss = wrapped({"image": torch.randn(2, 3, 32, 32), "text_ids": ids, "text_atts": atts}).loss
            loss.backward()
            trainable = [p for p in wrapped.module.parameters() if p.requires_grad]
            storages[name] = (len({p.grad.untyped_storage().data_ptr() for p in trainable}), len(trainable),
                              len(broadcasts))
    finally:
        dist.destroy_process_group()
    grads_default, n_params, broadcasts_default = storages["default"]
    grads_ours, _, broadcasts_ours = storages["ours"]
    assert grads_default == n_params and grads_ours < n_params / 10
    assert broadcasts_default >= 1 and broadcasts_ours == 0

"""ITC/ITM on two ranks (gloo, 2 CPU processes) vs the single-process loss on the concatenated batch.

Gradient rules checked (spec §4.2-4.3, §8.1): ITC gathers carry no gradient (each rank's features
get only its own rows' gradient) unless gather_with_grad; ITM image embeddings are gathered with
gradient (a rank's images receive gradient from negatives picked by the other rank). ITM negatives
use a deterministic argmax sampler so both runs pick the same pairs.
"""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from qformer.models.losses import ITCLoss, ITMLoss

W, B, Q, E, N, D, L = 2, 3, 4, 8, 5, 6, 7


def argmax_sampler(weights: torch.Tensor) -> torch.Tensor:
    return weights.argmax(dim=1)


def make_data():
    g = torch.Generator().manual_seed(0)
    return {
        "img": F.normalize(torch.randn(W * B, Q, E, generator=g), dim=-1),
        "txt": F.normalize(torch.randn(W * B, E, generator=g), dim=-1),
        "emb": torch.randn(W * B, N, D, generator=g),
        "ids": torch.randint(1, 50, (W * B, L), generator=g),
        "atts": torch.ones(W * B, L, dtype=torch.long),
    }


class ToyMatcher(nn.Module):
    """A differentiable stand-in for the Q-Former ITM pass: depends on both the image and the text."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.img = nn.Linear(D, 2)
        self.tok = nn.Embedding(50, 2)

    def forward(self, images, ids, atts):
        text = (self.tok(ids) * atts[..., None]).sum(1) / atts.sum(1, keepdim=True)
        return self.img(images.mean(1)) * (1 + text)


def _leaves(data, rows):
    return {k: (v[rows].clone().requires_grad_(v.is_floating_point())) for k, v in data.items()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    try:
        for gather_with_grad in (False, True):
            _rank_step(rank, out_dir, gather_with_grad)
        _gather_traffic(rank, out_dir)
    finally:
        dist.destroy_process_group()


def _rank_step(rank: int, out_dir: str, gather_with_grad: bool) -> None:
    data = make_data()
    x = _leaves(data, slice(rank * B, rank * B + B))
    temp = torch.tensor(0.07, requires_grad=True)
    matcher = ToyMatcher()
    itc = ITCLoss(gather_with_grad=gather_with_grad)(x["img"], x["txt"], temp)  # rank/world from dist
    itm = ITMLoss(sampler=argmax_sampler)(matcher, x["emb"], x["ids"], x["atts"], itc.sim_i2t, itc.sim_t2i)
    (itc.loss + itm).backward()
    torch.save(
        {
            "itc": itc.loss.detach(), "itm": itm.detach(), "temp_grad": temp.grad,
            "img_grad": x["img"].grad, "txt_grad": x["txt"].grad, "emb_grad": x["emb"].grad,
            "matcher_grad": matcher.img.weight.grad,
        },
        f"{out_dir}/rank{rank}_{int(gather_with_grad)}.pt",
    )


SLICE = 1 << 18  # floats per rank in the traffic measurement (1 MiB): far above gloo's own messages


def _bytes_written() -> int:
    """This process's bytes written by syscalls so far (sockets included: gloo's traffic)."""
    return next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("wchar"))


def _gather_traffic(rank: int, out_dir: str) -> None:
    """The ITM image gather's backward (all_gather_with_grad): the bytes this rank sends, and its gradient."""
    import torch.distributed as dist

    from qformer.models.gather import all_gather_with_grad

    x = torch.full((SLICE,), float(rank + 1), requires_grad=True)
    gathered = all_gather_with_grad(x, W)
    weights = torch.arange(W * SLICE, dtype=torch.float32) * (rank + 1)  # differs per rank: the sum must come back
    loss = (gathered * weights).sum()
    dist.barrier()
    before = _bytes_written()
    loss.backward()
    sent = _bytes_written() - before
    torch.save({"sent": sent, "grad": x.grad}, f"{out_dir}/traffic{rank}.pt")


def reference(data, gather_with_grad: bool):
    """Sum over simulated ranks of the per-rank losses, written out from the spec's formulas."""
    x = _leaves(data, slice(None))
    temp = torch.tensor(0.07, requires_grad=True)
    matcher = ToyMatcher()
    total, itcs, itms = 0.0, [], []
    for r in range(W):
        rows = slice(r * B, r * B + B)
        img_all = x["img"] if gather_with_grad else x["img"].detach()
        txt_all = x["txt"] if gather_with_grad else x["txt"].detach()
        sim_i2t = torch.einsum("bqe,je->bjq", x["img"][rows], txt_all).amax(-1) / temp
        sim_t2i = torch.einsum("be,jqe->bjq", x["txt"][rows], img_all).amax(-1) / temp
        tgt = torch.arange(r * B, r * B + B)
        itc = 0.5 * (F.cross_entropy(sim_i2t, tgt, label_smoothing=0.1) + F.cross_entropy(sim_t2i, tgt, label_smoothing=0.1))
        with torch.no_grad():
            own = (torch.arange(B), tgt)
            s_t2i, s_i2t = sim_t2i.clone(), sim_i2t.clone()
            s_t2i[own], s_i2t[own] = -10000.0, -10000.0
            neg_img = F.softmax(s_t2i, 1).argmax(1)
            neg_txt = F.softmax(s_i2t, 1).argmax(1)
        images = torch.cat([x["emb"][rows], x["emb"][neg_img], x["emb"][rows]])
        ids = torch.cat([x["ids"][rows], x["ids"][rows], x["ids"][neg_txt]])
        atts = torch.cat([x["atts"][rows], x["atts"][rows], x["atts"][neg_txt]])
        labels = torch.tensor([1] * B + [0] * 2 * B)
        itm = F.cross_entropy(matcher(images, ids, atts), labels)
        total = total + itc + itm
        itcs.append(itc.detach())
        itms.append(itm.detach())
    total.backward()
    return x, temp, matcher, itcs, itms


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """One 2-process gloo run computing both gather modes (spawning costs seconds)."""
    tmp = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(str(tmp / "pg"), str(tmp)), nprocs=W, join=True)
    return tmp


@pytest.mark.parametrize("gather_with_grad", [False, True])
def test_two_ranks_match_single_process(rank_results, gather_with_grad):
    ranks = [torch.load(rank_results / f"rank{r}_{int(gather_with_grad)}.pt") for r in range(W)]
    data = make_data()

    # values: mean over ranks == one process (world size 1, no process group) on the whole batch
    single_itc = ITCLoss()(data["img"], data["txt"], torch.tensor(0.07))
    single_itm = ITMLoss(sampler=argmax_sampler)(
        ToyMatcher(), data["emb"], data["ids"], data["atts"], single_itc.sim_i2t, single_itc.sim_t2i
    )
    assert torch.allclose(torch.stack([r["itc"] for r in ranks]).mean(), single_itc.loss, atol=1e-6)
    assert torch.allclose(torch.stack([r["itm"] for r in ranks]).mean(), single_itm, atol=1e-6)

    # gradients: each rank's local grads == the spec-rule reference restricted to its rows
    x, temp, matcher, itcs, itms = reference(data, gather_with_grad)
    for r, got in enumerate(ranks):
        rows = slice(r * B, r * B + B)
        assert torch.allclose(got["itc"], itcs[r], atol=1e-6) and torch.allclose(got["itm"], itms[r], atol=1e-6)
        assert torch.allclose(got["img_grad"], x["img"].grad[rows], atol=1e-6)
        assert torch.allclose(got["txt_grad"], x["txt"].grad[rows], atol=1e-6)
        assert torch.allclose(got["emb_grad"], x["emb"].grad[rows], atol=1e-6)
    assert torch.allclose(sum(r["temp_grad"] for r in ranks), temp.grad, atol=1e-5)
    assert torch.allclose(sum(r["matcher_grad"] for r in ranks), matcher.img.weight.grad, atol=1e-6)
    if not gather_with_grad:  # the no-grad gather really drops the cross-rank ITC gradient
        x2, *_ = reference(data, gather_with_grad=True)
        assert not torch.allclose(x2["img"].grad, x["img"].grad, atol=1e-4)


def test_the_gather_backward_sends_each_rank_its_slice_once(rank_results):
    """Each rank's gradient is the sum over ranks of its own slice's gradient; to get it, a rank sends the
    other ranks their slices only ((W - 1) x 1 MiB here, measured on gloo's sockets), not the whole stacked
    gradient twice over as an all-reduce does (2 (W - 1) x 1 MiB)."""
    slice_bytes = SLICE * 4
    for r in range(W):
        got = torch.load(rank_results / f"traffic{r}.pt")
        rows = torch.arange(r * SLICE, (r + 1) * SLICE, dtype=torch.float32)
        expected = sum(rows * (k + 1) for k in range(W))  # every rank's weights on this rank's slice
        assert torch.equal(got["grad"], expected)
        assert (W - 1) * slice_bytes <= got["sent"] < 1.25 * (W - 1) * slice_bytes, got["sent"]

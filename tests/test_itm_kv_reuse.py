"""The ITM pass reuses the query pass's image K/V (Blip2Qformer.reuse_itm_kv): losses and gradients
equal the pass that projects every row again (LAVIS), on one process and on two gloo ranks, and the
image K/V projections of the ITM rows really are gone (counted FLOPs)."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from helpers import small_model as _model  # eval: dropout off, both paths see the same network
from torch.utils.flop_counter import FlopCounterMode

from qformer.models.losses import ItmImages

B, N_IMG, WIDTH = 4, 17, 192  # 32 px / patch 8 -> 16 patches + cls; vit_tiny width
CAPTIONS = ["a red circle", "a small blue square at the top left", "green", "a big triangle on white"]


def _samples(model, rows: slice = slice(None)):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2 * B, 3, 32, 32, generator=g)[rows]
    ids, atts = model.tokenize((CAPTIONS * 2)[rows], 16)
    return {"image": images, "text_ids": ids, "text_atts": atts}


def _step(model, samples, reuse: bool, seed: int = 1):
    """Losses and every parameter gradient of one forward/backward (negatives drawn with `seed`)."""
    model.reuse_itm_kv = reuse
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(samples)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: getattr(out, k).detach() for k in ("loss_itc", "loss_itm", "loss_lm")}, grads


def _assert_same(a, b):
    (losses_a, grads_a), (losses_b, grads_b) = a, b
    for key in losses_a:
        assert torch.allclose(losses_a[key], losses_b[key], atol=1e-6), key
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4), name


@pytest.fixture(scope="module")
def model(tiny_bert):
    return _model(tiny_bert)


def test_reuse_equals_recomputing_on_one_process(model):
    samples = _samples(model, slice(0, B))
    reused, projected = _step(model, samples, True), _step(model, samples, False)
    _assert_same(reused, projected)
    # ln_vision and the cross-attention key weights learn from the ITM rows through the reused K/V
    assert reused[1]["ln_vision.weight"].abs().sum() > 0
    assert reused[1]["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].abs().sum() > 0
    model.reuse_itm_kv = True


def test_rows_from_other_ranks_are_projected_and_local_rows_indexed(model):
    """ItmImages with extra (gathered) rows: the K/V path equals feeding the row embeddings."""
    samples = _samples(model)
    with torch.no_grad():
        local = model.ln_vision(model.vit_features(samples["image"][:B]))
        extra = model.ln_vision(model.vit_features(samples["image"][B:]))
        local_kv = model._query_pass(local, return_cross_kv=True).cross_key_values
        images = ItmImages(torch.tensor([0, 1, 2, 3, 5, 4, 7, 6, 3, 2, 1, 0]), local, extra)
        ids, atts = samples["text_ids"][:B].repeat(3, 1), samples["text_atts"][:B].repeat(3, 1)
        by_kv = model.itm_logits(images, ids, atts, local_kv=local_kv)
        by_rows = model.itm_logits(images.embeddings(), ids, atts)
    assert by_kv.shape == (3 * B, 2)
    assert torch.allclose(by_kv, by_rows, atol=1e-5)


def test_itm_image_projections_are_skipped(model):
    """Counted matmul FLOPs drop by exactly the ITM rows' image K/V projections: 3 rows per image,
    K and V, in every cross-attention layer."""
    samples = _samples(model, slice(0, B))
    counted = {}
    for reuse in (True, False):
        model.reuse_itm_kv = reuse
        with FlopCounterMode(display=False) as counter:
            torch.manual_seed(1)
            model(samples)
        counted[reuse] = counter.get_total_flops()
    model.reuse_itm_kv = True
    hidden = model.Qformer.config.hidden_size
    n_cross = sum(layer.has_cross_attention for layer in model.Qformer.bert.encoder.layer)
    assert counted[False] - counted[True] == 3 * B * n_cross * 2 * (2 * N_IMG * WIDTH * hidden)


def _rank_worker(rank: int, init_file: str, out_dir: str, bert_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = _model(bert_path)
        samples = _samples(model, slice(rank * B, rank * B + B))
        results = {reuse: _step(model, samples, reuse, seed=10 + rank) for reuse in (True, False)}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_reuse_equals_recomputing_on_two_ranks(tiny_bert, tmp_path):
    """Negative images gathered from the other rank are projected, local rows reuse K/V; the
    backward all-reduce of the image gather still runs on every rank (no hang)."""
    mp.spawn(_rank_worker, args=(str(tmp_path / "pg"), str(tmp_path), tiny_bert), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        _assert_same(results[True], results[False])

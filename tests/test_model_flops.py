"""Analytic FLOP model vs torch's FlopCounterMode, and a quick `qformer bench step` run."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import small_model
from qformer.models.flops import QFormerDims, qformer_forward_flops, train_flops_per_sample, vit_forward_flops


def _model(tiny_bert):
    return small_model(tiny_bert, vit_kwargs={"depth": 2}, max_txt_len=10)  # seeded, eval mode


def test_analytic_flops_match_counted_matmuls(tiny_bert):
    """Under the math SDPA backend FlopCounterMode sees attention as matmuls (the fused CPU kernel it does not
    count), so it counts what the analytic model counts: the ViT exactly, the forward but for the ITC sims."""
    model = _model(tiny_bert)
    b, queries, embed_dim = 2, 4, 16
    img = torch.randn(b, 3, 32, 32)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.visual_encoder(img)
    assert vit_forward_flops(model.visual_encoder, 32) == counter.get_total_flops() / b

    ids = torch.randint(5, len(model.tokenizer) - 1, (b, 10))  # word ids of the BERT's vocabulary
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model({"image": img, "text_ids": ids, "text_atts": torch.ones_like(ids)})
    analytic = train_flops_per_sample(model, 32, 10, lm_targets=9)  # all 10 tokens real: 9 predicted
    itc_sims = 2 * (2 * b * queries * embed_dim)  # left out as negligible: each sample's row of i2t and of t2i
    assert counter.get_total_flops() / b == analytic["qformer_forward_total"] + analytic["vit_forward"] + itc_sims


def test_bench_step_quick_writes_result(tmp_path):
    """One smoke run, the smallest: the result's fields and the relations between its counted quantities.
    With --features the ViT is not part of the step; the image path's FLOPs are checked above."""
    from qformer.bench import step

    parser = argparse.ArgumentParser()
    step.add_arguments(parser)
    args = parser.parse_args([
        "--cfg-path", "experiments/demo/tiny_shapes.yaml", "--quick", "--steps", "1", "--batch-size", "2",
        "--out-dir", str(tmp_path), "--options", "model.vit_kwargs.depth=1", "model.num_query_token=4",
        "model.max_txt_len=8", "--features",
    ])
    payload = step.run(args)
    saved = json.loads((tmp_path / "step-latest.json").read_text())
    assert saved["benchmark"] == "step" and saved["batch_size"] == 2 and saved["features"] is True
    assert {"samples_per_s", "step_time_s", "step_time_recompute_itm_kv_s", "speedup_itm_kv_reuse", "achieved_flops",
            "matmul_peak_flops", "achieved_over_matmul_peak", "peak_memory_bytes", "trainable_params",
            "step_time_lavis_s", "speedup_vs_lavis", "speedup_vs_lavis_cpu", "step_cpu_s"} <= saved.keys()
    assert saved["timed_steps"] == len(saved["step_times_s"]) == len(saved["step_times_lavis_s"]) == 1
    # the three paths compute the same losses on the same weights: they differ in work only
    same = saved["same_weights_losses"]
    assert set(same["losses"]) == {"ours", "recompute_itm_kv", "lavis"} and same["max_abs_difference"] <= 1e-5
    assert same["losses"]["ours"]["loss_lm"] > 0 and saved["optimizer_kernel"] in ("fused", "foreach")
    assert (saved["dtype"], saved["peak_memory_kind"]) == {
        "cpu": ("float32", "process max RSS"), "cuda": ("float16", "cuda max_memory_allocated")}[saved["device"]]
    losses = payload["last_losses"]  # the step's loss is the unweighted sum of the three (spec §4.5)
    assert losses["loss"] == pytest.approx(losses["loss_itc"] + losses["loss_itm"] + losses["loss_lm"], rel=1e-5)

    flops = payload["model_flops_per_sample"]
    dims = QFormerDims(**flops["dims"])  # the options given, and tiny's 64 px / patch 8 ViT
    assert (dims.queries, dims.text_len, dims.image_tokens) == (4, 8, (64 // 8) ** 2 + 1)
    # one rank reusing the query pass's image K/V: no ITM row projects them
    expected = qformer_forward_flops(dims, 8, payload["lm_targets"], itm_kv_rows=0)
    assert flops["qformer_forward"] == pytest.approx(expected)
    assert flops["qformer_forward_total"] == pytest.approx(sum(flops["qformer_forward"].values()))
    assert flops["vit_forward"] == 0 and flops["total"] == pytest.approx(3 * flops["qformer_forward_total"])
    # recomputing (LAVIS) adds, for each of the 3 ITM rows, fwd + 2x bwd of the cross-attention layers' image K and V
    cross_layers = len(range(0, dims.layers, dims.cross_attention_freq))
    image_kv = cross_layers * 2 * 2 * dims.image_tokens * dims.image_width * dims.hidden
    assert (payload["flops_ratio_itm_kv_reuse"] - 1) * flops["total"] == pytest.approx(3 * 3 * image_kv)

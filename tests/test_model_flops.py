"""Analytic FLOP model vs torch's FlopCounterMode, and a quick `qformer bench step` run."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from qformer.models import build_model
from qformer.models.flops import train_flops_per_sample, vit_forward_flops


def _model(minilm_path):
    torch.manual_seed(0)
    cfg = OmegaConf.create({
        "arch": "blip2", "load_pretrained": False, "vit_model": "timm:vit_tiny_patch16_224",
        "vit_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}, "image_size": 32, "vit_precision": "fp32",
        "num_query_token": 4, "bert_model": minilm_path, "max_txt_len": 10, "embed_dim": 16,
    })
    return build_model(cfg).eval()


def test_analytic_flops_match_counted_matmuls(minilm_path):
    """FlopCounterMode does not count CPU SDPA, so the analytic count must exceed it by exactly
    the attention matmuls for the ViT, and by a small attention share for the whole step."""
    model = _model(minilm_path)
    b, n, width, blocks = 2, 17, 192, 2
    img = torch.randn(b, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        model.visual_encoder(img)
    counted_vit = counter.get_total_flops() / b
    assert vit_forward_flops(model.visual_encoder, 32) - counted_vit == blocks * 2 * 2 * n * n * width

    ids = torch.randint(1000, 2000, (b, 10))
    with FlopCounterMode(display=False) as counter:
        model({"image": img, "text_ids": ids, "text_atts": torch.ones_like(ids)})
    counted = counter.get_total_flops() / b
    analytic = train_flops_per_sample(model, 32, 10, lm_targets=9)
    fwd = analytic["qformer_forward_total"] + analytic["vit_forward"]
    assert counted < fwd < 1.02 * counted
    assert analytic["total"] == 3 * analytic["qformer_forward_total"] + analytic["vit_forward"]


@pytest.mark.parametrize("features", [False, True])
def test_bench_step_quick_writes_result(tmp_path, features):
    from qformer.bench import step

    parser = argparse.ArgumentParser()
    step.add_arguments(parser)
    args = parser.parse_args([
        "--cfg-path", "experiments/demo/tiny_shapes.yaml", "--quick", "--steps", "1", "--batch-size", "2",
        "--out-dir", str(tmp_path), "--options", "model.vit_kwargs.depth=1", "model.num_query_token=4",
        "model.max_txt_len=8",
    ] + (["--features"] if features else []))
    payload = step.run(args)
    saved = json.loads((tmp_path / "step-latest.json").read_text())
    assert saved["benchmark"] == "step" and saved["batch_size"] == 2
    assert payload["samples_per_s"] > 0 and payload["matmul_peak_flops"] > 0 and payload["peak_memory_bytes"] > 0
    flops = payload["model_flops_per_sample"]
    if features:  # cached features: the ViT is not part of the step
        assert flops["vit_forward"] == 0 and flops["total"] == 3 * flops["qformer_forward_total"]
    else:
        assert flops["total"] > flops["vit_forward"] > 0
    assert payload["flops_ratio_itm_kv_reuse"] > 1.0  # the ITM rows' image K/V are not counted twice
    assert payload["step_time_recompute_itm_kv_s"] > 0 and payload["speedup_itm_kv_reuse"] > 0
    assert 0 < payload["achieved_over_matmul_peak"]

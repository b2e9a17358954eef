"""The FLOP model behind the ViT-g projection, checked against torch's FlopCounterMode, and the bench."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from qformer.bench.cache import projection
from qformer.features.flops import (
    BERT_BASE_QFORMER, EVA_VIT_G, LAVIS_STEP, OURS_MULTI_RANK, OURS_ONE_RANK, VitDims,
    cache_speedup, qformer_train_flops, vit_forward_flops,
)
from qformer.models.flops import QFormerDims


def test_vit_flops_match_flop_counter_on_a_timm_vit():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=8,
                            depth=3).eval()
    # the math SDPA backend decomposes into counted matmuls (the fused CPU kernel is not counted)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        vit.forward_features(torch.zeros(2, 3, 64, 64))
    dims = VitDims(image_size=64, patch=8, width=192, depth=3, mlp=768)
    assert counter.get_total_flops() / 2 == pytest.approx(vit_forward_flops(dims), rel=0.02)


def test_eva_vit_g_forward_is_about_half_a_teraflop():
    # 39 blocks x (8*257*1408^2 + 4*257^2*1408 + 4*257*1408*6144) + patch embedding
    assert vit_forward_flops(EVA_VIT_G) == pytest.approx(520.7e9, rel=1e-3)


@pytest.fixture(scope="module")
def tiny_model(tiny_bert):
    from qformer.config import load_config_dict
    from qformer.models import build_model

    cfg = load_config_dict({"model": {"arch": "blip2", "model_type": "tiny", "bert_model": tiny_bert}})
    torch.manual_seed(0)
    return cfg, build_model(cfg.model).train()


def test_qformer_train_flops_match_flop_counter_on_the_real_model(tiny_model):
    cfg, model = tiny_model
    b = 4
    ids = torch.randint(5, len(model.tokenizer) - 1, (b, 32))  # word ids of the BERT's vocabulary
    ids[:, 0] = 101
    samples = {"image_embeds": torch.randn(b, 65, 192), "text_ids": ids, "text_atts": torch.ones(b, 32, dtype=torch.long)}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(samples).loss.backward()
    bert = model.Qformer.config
    q = QFormerDims(hidden=bert.hidden_size, layers=bert.num_hidden_layers, intermediate=bert.intermediate_size,
                    queries=8, text_len=32, vocab=bert.vocab_size, embed_dim=256)
    analytic = qformer_train_flops(q, n_img=65, d_img=192, batch=b, step=OURS_ONE_RANK)
    assert counter.get_total_flops() / b == pytest.approx(analytic, rel=0.10)
    lavis = qformer_train_flops(q, n_img=65, d_img=192, batch=b, step=LAVIS_STEP)
    assert counter.get_total_flops() / b < lavis  # the model really skips the ITM rows' image K/V


def test_projection_orders_and_kv_reuse_helps():
    lavis, multi, one = (cache_speedup(EVA_VIT_G, BERT_BASE_QFORMER, step=s) for s in (LAVIS_STEP, OURS_MULTI_RANK, OURS_ONE_RANK))
    assert 1.0 < lavis["projected_speedup"] < multi["projected_speedup"] < one["projected_speedup"]
    assert lavis["vit_forward_gflops"] > lavis["qformer_train_gflops"]
    # each skipped ITM row saves K and V (fwd + 2x bwd) in the 6 cross-attention layers
    saved_per_row = 3 * 6 * 2 * (2 * EVA_VIT_G.tokens * EVA_VIT_G.width * 768) / 1e9
    assert multi["qformer_train_gflops"] - one["qformer_train_gflops"] == pytest.approx(saved_per_row)


def test_bench_cache_quick_writes_a_result(tmp_path):
    from qformer.bench import cache

    parser = argparse.ArgumentParser()
    cache.add_arguments(parser)
    args = parser.parse_args(["--images", "4", "--batch-size", "2", "--repeats", "1", "--vit", "timm:vit_tiny_patch16_224",
                              "--image-size", "64", "--queries", "8", "--out-dir", str(tmp_path)])
    payload = cache.run(args)
    written = json.loads((tmp_path / "cache-latest.json").read_text())
    assert written["benchmark"] == "cache" and "machine" in written
    measured = written["measured_cpu"]
    assert measured["config"]["images_per_epoch"] == 4
    assert {path: len(times) for path, times in measured["epoch_seconds_all"].items()} == {"online": 1, "cached": 1}
    assert {"speedup_measured", "cache_build_seconds"} <= measured.keys()
    # counted FLOPs, not time: the cached step skips exactly the ViT forward, and the rest is the Q-Former's step
    counted, analytic = measured["counted_gflops_per_image"], measured["analytic_gflops_per_image"]
    assert counted["online"] - counted["cached"] == pytest.approx(analytic["vit_forward"], rel=0.02)
    assert counted["cached"] == pytest.approx(analytic["qformer_train"], rel=0.10)
    assert measured["speedup_counted_flops"] == pytest.approx(measured["speedup_analytic_same_config"], rel=0.15)
    projection = payload["projection_vit_g"]
    assert projection["widest_text_meeting_target"].keys() == {"lavis", "ours_multi_rank", "ours_one_rank"}
    by_width = projection["projected_speedup_by_text_width"]
    assert by_width["32"]["lavis"] < by_width["32"]["ours_one_rank"] < by_width["20"]["ours_one_rank"]
    widths = sorted(by_width, key=int)  # narrower text after the trim: a cheaper step, a larger share for the ViT
    for mode in ("ours_multi_rank", "ours_one_rank"):
        assert [by_width[w][mode] for w in widths] == sorted((by_width[w][mode] for w in widths), reverse=True)
    assert len({by_width[w]["lavis"] for w in widths}) == 1  # LAVIS pads to max_txt_len: no trim


def test_projection_at_a_datasets_caption_widths(synth_data, tiny_bert):
    from qformer.bench.cache import caption_widths, projection_at_widths
    from qformer.config import load_config_dict
    from qformer.data.synth import coco_caption_section

    cfg = load_config_dict({"model": {"arch": "blip2", "model_type": "tiny", "bert_model": tiny_bert},
                            "datasets": coco_caption_section(synth_data), "run": {"batch_size_train": 16}})
    widths = caption_widths(cfg, batches=20)
    assert len(widths) == 20 and all(4 <= w < 32 for w in widths)  # short synthetic captions: trimmed
    at = projection_at_widths(widths)
    full = projection_at_widths([32] * 20)  # untrimmed width: the table's 32-column row
    assert at["width_max"] == max(widths)
    assert full["projected_speedup_ours_one_rank"] == pytest.approx(
        projection()["projected_speedup_by_text_width"]["32"]["ours_one_rank"])
    for mode in ("ours_multi_rank", "ours_one_rank"):  # shorter text, cheaper step, larger share for the ViT
        assert at[f"projected_speedup_{mode}"] > full[f"projected_speedup_{mode}"]
    assert at["projected_speedup_lavis"] == full["projected_speedup_lavis"]  # LAVIS pads to max_txt_len


def test_missing_caption_annotations_stop_the_bench_first_with_one_line(tmp_path, capsys):
    from qformer.cli import main

    cfg = tmp_path / "exp.yaml"
    missing = tmp_path / "nope" / "train.json"
    cfg.write_text(f"""model: {{arch: blip2, model_type: tiny}}
datasets:
  coco_caption:
    build_info:
      annotations: {{train: {{storage: {missing}}}}}
      images: {{storage: {tmp_path}}}
""")
    assert main(["bench", "cache", "--captions-cfg", str(cfg), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: annotation file not found" in err and "Traceback" not in err
    assert not list(tmp_path.glob("cache-*.json"))  # stopped before measuring anything

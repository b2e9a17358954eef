"""ViT precision: how far the fp16 frozen ViT's features are from fp32, at full EVA ViT-g (or CLIP ViT-L) size.

One random encoder (seeded; the figures are for random weights), one batch of images, three forwards:
fp32 (the baseline), fp16 as LAVIS runs it (Linear/Conv weights in fp16 under fp16 autocast; EVA's class
token and position table stay fp32, so its residual stream is fp32), and the same fp16 weights with the
residual stream kept in fp16 (class token and position table cast down, which is what this platform did
before: `fp16_stream`). Reported: each one's error against fp32 (relative Frobenius norm and the largest
absolute difference over the largest value) and their ratio. CPU by default: a full-size ViT-g forward
there takes about 10 s per image on two cores.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from qformer.bench.common import write_result

FULL = {"eva_clip_g": {}, "clip_L": {}}
QUICK = {"eva_clip_g": {"embed_dim": 64, "depth": 4, "num_heads": 4},
         "clip_L": {"width": 64, "layers": 4, "heads": 4}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vit", default="eva_clip_g", choices=sorted(FULL), help="encoder (LAVIS sizes)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--depth", type=int, default=None, help="blocks (default: the full 39 / 23)")
    parser.add_argument("--quick", action="store_true", help="a 64-wide, 4-block encoder (seconds, for tests)")
    parser.add_argument("--out-dir", default=None, help="results directory (default experiments/benchmarks/results)")


def _errors(value, reference) -> dict[str, float]:
    value, reference = value.float(), reference.float()
    return {"relative": float((value - reference).norm() / reference.norm()),
            "max_abs_over_max": float((value - reference).abs().max() / reference.abs().max())}


def measure(vit: str = "eva_clip_g", device: str = "cpu", batch_size: int = 2, image_size: int = 224,
            sizes: dict | None = None) -> dict[str, Any]:
    """fp32 / LAVIS fp16 / fp16-stream features of one seeded random encoder; callable without Ray or MLflow
    (the device check runs it on a lent GPU)."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import torch

    from qformer.models.vision import build_vision_encoder
    from qformer.models.vision.weights import convert_weights_to_fp16

    torch.manual_seed(0)
    start = time.perf_counter()
    encoder = build_vision_encoder(vit, image_size, vit_kwargs=dict(sizes or {})).eval().to(device)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(1)).to(device)
    built = time.perf_counter() - start
    with torch.no_grad():
        fp32 = encoder(images).cpu()
        convert_weights_to_fp16(encoder)  # in place: one copy of the weights at a time
        with torch.autocast(torch.device(device).type, dtype=torch.float16):
            lavis = encoder(images)
            stream_dtype = str(lavis.dtype)
            lavis = lavis.cpu()
            variants = {"lavis_fp16": lavis}
            if vit == "eva_clip_g":  # CLIP's stream is fp16 in LAVIS too: there is no other variant to show
                for name in ("cls_token", "pos_embed"):
                    getattr(encoder, name).data = getattr(encoder, name).data.half()
                variants["fp16_stream"] = encoder(images).cpu()
    result: dict[str, Any] = {
        "vit": vit, "device": device, "batch_size": batch_size, "image_size": image_size,
        "depth": len(getattr(encoder, "blocks", None) or encoder.transformer.resblocks),
        "width": encoder.num_features, "lavis_fp16_output_dtype": stream_dtype,
        "error_vs_fp32": {name: _errors(value, fp32) for name, value in variants.items()},
        "build_seconds": built, "seconds": time.perf_counter() - start,
    }
    if "fp16_stream" in variants:
        errors = result["error_vs_fp32"]
        result["fp16_stream_over_lavis"] = errors["fp16_stream"]["relative"] / errors["lavis_fp16"]["relative"]
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = dict(QUICK[args.vit] if args.quick else FULL[args.vit])
    if args.depth:
        sizes["depth" if args.vit == "eva_clip_g" else "layers"] = args.depth
    size = 32 if args.quick else args.image_size
    if args.quick:
        sizes["patch_size"] = 8
    payload = measure(args.vit, args.device, args.batch_size, size, sizes)
    path = write_result(f"vit-precision-{args.vit}", payload, args.out_dir)
    errors = payload["error_vs_fp32"]
    print(f"{args.vit} ({payload['depth']} blocks, {payload['width']} wide, {size} px, batch {args.batch_size}, "
          f"{args.device}): fp16 error against fp32, relative")
    for name, err in errors.items():
        print(f"  {name}: {err['relative']:.3e} (max |diff| / max |fp32| {err['max_abs_over_max']:.3e})")
    if "fp16_stream_over_lavis" in payload:
        print(f"  fp16 residual stream / LAVIS's fp32 stream: {payload['fp16_stream_over_lavis']:.2f}x")
    print(f"  -> {path}")
    return payload

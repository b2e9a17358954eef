"""Export a trained checkpoint to a transformers directory (`from_pretrained` loads it).

With the EVA encoder (`model.vit_model: eva_clip_g`) the whole retrieval model is written as
`Blip2ForImageTextRetrieval` (ViT, ln_vision as the vision post-layernorm, Q-Former, projections,
ITM head); with any other encoder only the Q-Former body is written, as `Blip2QFormerModel`.
transformers has no place for the LM head or `temp`; they are left out. The tokenizer (with
[DEC]) is saved beside the weights.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg-path", required=True, help="experiment YAML the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, help="checkpoint .pth ({'model': state_dict} or a state dict)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--qformer-only", action="store_true", help="write only Blip2QFormerModel")


def run(args: argparse.Namespace) -> int:
    # lazy: `qformer --help` imports every command module (see qformer/cli.py)
    from qformer.config import load_config
    from qformer.models import build_model
    from qformer.models.hf_convert import export_hf
    from qformer.models.vision.eva_vit import EvaVisionTransformer
    from qformer.train.checkpoint import check_readable

    # the checkpoint given here is what gets exported, not the config's pretrained/finetuned files
    cfg = load_config(args.cfg_path, list(args.options) + ["model.load_pretrained=False", "model.load_finetuned=False"])
    check_readable(args.checkpoint)  # before building the (possibly ViT-g sized) model
    model = build_model(cfg.model).eval()
    report = model.load_checkpoint(args.checkpoint)
    missing = [k for k in report["missing"] if not k.startswith("visual_encoder.")]
    if missing:
        print(f"warning: {len(missing)} Q-Former/head tensors not in {args.checkpoint}, e.g. {missing[:3]}")
    qformer_only = args.qformer_only or not isinstance(model.visual_encoder, EvaVisionTransformer)
    if qformer_only and not args.qformer_only:
        print(f"note: model.vit_model={cfg.model.vit_model} has no transformers counterpart; exporting the Q-Former only")
    out = export_hf(model, args.out, qformer_only=qformer_only)
    kind = "Blip2QFormerModel" if qformer_only else "Blip2ForImageTextRetrieval"
    print(f"wrote {kind} to {out}")
    return 0

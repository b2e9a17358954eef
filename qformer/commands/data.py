"""Data tools: `synth` writes the synthetic shapes data set; `check` validates a config's data.

  qformer data synth --out DIR [--n-train 2000 --n-val 200 --n-test 200 --seed 0 --image-size 96]
  qformer data synth --out DIR --format wds|parquet|jsonl|csv [--shards 4 --per-shard 64] [--upload s3://b/p]
  qformer data check --cfg-path F [--options k=v ...] [--no-images] [--report-only] [--full]

`check` exits 1 when an annotation file is bad, an image folder is missing, an image does not decode, or a
shard is missing or damaged (--report-only: undecodable images are then just listed). Shard datasets are
verified by reading a seeded sample of 8 shards (--full: every shard, on Ray tasks when RAY_ADDRESS names
a cluster) and compared with what their metadata says.
"""
from __future__ import annotations

import argparse
import os

from qformer.core.logs import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("synth", help="write a COCO-Karpathy-format synthetic shapes data set")
    s.add_argument("--out", required=True, help="output directory (annotations/ and images/ go under it)")
    s.add_argument("--n-train", type=int, default=2000, help="training images (5 captions each)")
    s.add_argument("--n-val", type=int, default=200)
    s.add_argument("--n-test", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=96, help="side of the square JPEGs in pixels")
    s.add_argument("--format", choices=("coco", "wds", "parquet", "jsonl", "csv"), default="coco",
                   help="coco: Karpathy annotation files + image folders (default); else image-text training shards")
    s.add_argument("--shards", type=int, default=4, help="shards to write (shard formats)")
    s.add_argument("--per-shard", type=int, default=64, help="image-text pairs per shard (shard formats)")
    s.add_argument("--upload", default=None, metavar="URI",
                   help="also copy the shards to this object-storage prefix (s3://bucket/prefix; endpoint from "
                        "AWS_ENDPOINT_URL)")
    c = sub.add_parser("check", help="validate every annotation file and image of a config; print a report")
    c.add_argument("--cfg-path", required=True)
    c.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    c.add_argument("--no-images", action="store_true", help="check annotations only, do not decode images")
    c.add_argument("--report-only", action="store_true",
                   help="list missing or undecodable images without failing (exit 0 unless an annotation file is bad)")
    c.add_argument("--workers", type=int, default=None,
                   help="processes decoding images (default: CPUs, max 8); threads reading shards (default 4)")
    c.add_argument("--full", action="store_true",
                   help="read every shard, not a seeded sample of 8 (on Ray tasks when RAY_ADDRESS names a cluster)")


def run(args: argparse.Namespace) -> int:
    if args.action == "synth" and args.format != "coco":
        # lazy: `qformer --help` imports every command module (see qformer/cli.py)
        from qformer.data.synth_shards import upload_tree, write_shards

        info = write_shards(args.out, args.format, args.shards, args.per_shard, args.seed, args.image_size)
        print(f"wrote {info['num_samples']} pairs in {args.shards} {args.format} shards: {info['storage']}")
        if args.upload:
            n = upload_tree(info["folder"], args.upload)
            print(f"uploaded {n} files to {args.upload.rstrip('/')}/ (storage: "
                  f"{args.upload.rstrip('/')}/{info['storage'].rsplit('/', 1)[1]})")
        return 0
    if args.action == "synth":
        # lazy: `qformer --help` imports every command module (see qformer/cli.py)
        from qformer.data.synth import write_synthetic

        counts = write_synthetic(args.out, args.n_train, args.n_val, args.n_test, args.seed, args.image_size)
        print(f"wrote {counts} images to {args.out}")
        return 0
    # lazy: `qformer --help` imports every command module (see qformer/cli.py)
    from qformer.config import load_config
    from qformer.data.check import check_config, failed, format_report

    setup_logging()  # progress lines when stdout is not a terminal

    use_ray = bool(args.full and os.environ.get("RAY_ADDRESS"))
    if use_ray:
        import ray  # lazy: only a full shard check on a cluster starts Ray

        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    reports = check_config(load_config(args.cfg_path, args.options), images=not args.no_images, workers=args.workers,
                           full=args.full, use_ray=use_ray)
    print(format_report(reports))
    return 1 if failed(reports, images_fail=not args.report_only) else 0

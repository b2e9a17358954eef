"""Data tools: `download` fetches COCO / VG / Flickr30K as LAVIS lays them out; `prepare` turns a web URL list
into image-text shards; `synth` writes the synthetic shapes data set; `check` validates a config's data.

  qformer data download coco vg flickr30k [--root DIR|s3://b/p] [--mirror URL|HOST=URL ...] [--workers 4]
  qformer data prepare --url-list FILE --out DIR|s3://b/p [--format wds|parquet] [--shard-size 10000]

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
    d = sub.add_parser("download", help="LAVIS's annotation files and the COCO 2014 / Visual Genome images, "
                                        "resumable and verified, into the layout the builders read")
    d.add_argument("names", nargs="+", metavar="NAME", help="coco, vg, flickr30k (annotations only: images need a form)")
    d.add_argument("--root", default=None, help="data root: a folder or s3://bucket/prefix (default: run.data_root's "
                                                "default, QFORMER_DATA_ROOT or $QFORMER_HOME/data)")
    d.add_argument("--mirror", action="append", default=[], metavar="URL|HOST=URL",
                   help="a base URL that replaces every host (or only HOST) of the publishers' URLs; repeatable")
    d.add_argument("--workers", type=int, default=4, help="files fetched at once")
    d.add_argument("--keep-archives", action="store_true", help="keep the zip files after unpacking them")
    d.add_argument("--staging", default=None, help="local folder for archives when --root is a bucket")
    p = sub.add_parser("prepare", help="download a web URL+caption list into image-text shards (img2dataset layout)")
    p.add_argument("--url-list", required=True, help="TSV/CSV/Parquet/JSONL file of url + caption rows (local or s3://)")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--format", choices=("wds", "parquet"), default="wds")
    p.add_argument("--url-col", default="url")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--shard-size", type=int, default=10000, help="rows of the list per shard (img2dataset's default)")
    p.add_argument("--threads", type=int, default=64, help="downloads in flight per shard task")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per image request (img2dataset's default)")
    p.add_argument("--image-size", type=int, default=0,
                   help="resize so the shorter side is at most this (0: keep the downloaded bytes)")
    p.add_argument("--engine", choices=("ray", "img2dataset"), default="ray",
                   help="ray: the platform's Ray tasks (default); img2dataset: its Ray distributor (pip install "
                        "'qformer-platform[prepare]')")
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
    if args.action == "download":
        # lazy: `qformer --help` imports every command module (see qformer/cli.py)
        from qformer.core.http_fetch import parse_mirrors
        from qformer.jobs.data_download import download

        setup_logging()
        report = download(args.names, args.root, parse_mirrors(args.mirror), workers=args.workers,
                          keep_archives=args.keep_archives, staging=args.staging)
        print(report.summary())
        return 1 if report.failed else 0
    if args.action == "prepare":
        from qformer.jobs.prepare_job import prepare_command  # lazy: as above

        setup_logging()
        return prepare_command(args)
    if args.action == "synth" and args.format != "coco":
        # lazy: `qformer --help` imports every command module (see qformer/cli.py)
        from qformer.data.storage import upload_tree
        from qformer.data.synth_shards import write_shards

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

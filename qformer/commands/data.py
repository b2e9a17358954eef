"""Data tools: `download` fetches COCO / VG / Flickr30K as LAVIS lays them out; `prepare` turns a web URL list
into image-text shards; `capfilt` ranks synthetic captions for them (BLIP-2 CapFilt); `synth` writes the
synthetic shapes data set; `check` validates a config's data.

  qformer data download coco vg flickr30k [--root DIR|s3://b/p] [--mirror URL|HOST=URL ...] [--workers 4]
  qformer data prepare --url-list FILE --out DIR|s3://b/p [--format wds|parquet] [--shard-size 10000]

  qformer data synth --out DIR [--n-train 2000 --n-val 200 --n-test 200 --seed 0 --image-size 96]
  qformer data synth --out DIR --format wds|parquet|jsonl|csv [--shards 4 --per-shard 64] [--upload s3://b/p]
  qformer data check --cfg-path F [--options k=v ...] [--no-images] [--report-only] [--full]
  qformer data capfilt --in PATTERN --out DIR|s3://... [--captioner NAME] [--scorer NAME] [--num-captions 10]
                       [--keep 2] [--top-p 0.9] [--seed 0] [--tracking-uri URI]

`check` exits 1 when an annotation file is bad, an image folder is missing, an image does not decode, or a
shard is missing or damaged (--report-only: undecodable images are then just listed). Shard datasets are
verified by reading a seeded sample of 8 shards (--full: every shard, on Ray tasks when RAY_ADDRESS names
a cluster) and compared with what their metadata says.

`capfilt` (BLIP-2 §3.4) captions every image of the shards `num-captions` times with an image-captioning
model, ranks those captions and the web caption by CLIP similarity and writes the shards again under --out
with the top `keep` as a `captions` list (training draws one per pass); a rerun continues with the shards
not written yet. Runs on the cluster RAY_ADDRESS names (GPU actors when it has GPUs), else a local Ray.
See docs/capfilt.md.
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
    f = sub.add_parser("capfilt", help="synthetic captions ranked by CLIP (BLIP-2 CapFilt), written as new shards")
    f.add_argument("--in", dest="inputs", required=True, nargs="+", metavar="PATTERN",
                   help="input shards: brace pattern, glob or list, local or s3:// (any format training reads)")
    f.add_argument("--out", required=True, help="output folder (local or s3://): one shard per input shard")
    f.add_argument("--captioner", default="Salesforce/blip-image-captioning-large",
                   help="transformers image-captioning model: hub name (cached) or local directory")
    f.add_argument("--scorer", default="openai/clip-vit-large-patch14", help="transformers CLIP model: name or directory")
    f.add_argument("--num-captions", type=int, default=10, help="synthetic captions per image")
    f.add_argument("--keep", type=int, default=2, help="captions kept per image (the best by CLIP similarity)")
    f.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    f.add_argument("--prompt", default="a picture of ", help="captioner prompt, removed from the captions ('' for none)")
    f.add_argument("--seed", type=int, default=0, help="sampling seed (with the shard name and sample index)")
    f.add_argument("--format", choices=("wds", "parquet", "jsonl", "csv"), default=None,
                   help="input format (default: from the file suffix)")
    f.add_argument("--batch-size", type=int, default=32, help="images per decode task and actor call")
    f.add_argument("--captioners", type=int, default=None, help="captioner actors (default: one per GPU, else 1)")
    f.add_argument("--scorers", type=int, default=None, help="scorer actors (default: one per GPU, else 1)")
    f.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs each actor reserves")
    f.add_argument("--task-cpus", type=float, default=1.0, help="CPUs each read/decode task reserves")
    f.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    f.add_argument("--tracking-uri", default=None,
                   help="log the summary to an MLflow run at this store (default: MLFLOW_TRACKING_URI if set, else off)")
    f.add_argument("--experiment", default="qformer-capfilt", help="MLflow experiment of that run")


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
    if args.action == "capfilt":
        return _capfilt(args)
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


def _capfilt(args: argparse.Namespace) -> int:
    # lazy: `qformer --help` imports every command module (see qformer/cli.py)
    from qformer.data.capfilt.pipeline import CapfiltSpec
    from qformer.jobs.capfilt import Tracking, capfilt_job

    setup_logging()
    spec = CapfiltSpec(args.captioner, args.scorer, args.num_captions, args.keep, args.top_p, args.prompt, args.seed,
                       args.batch_size, args.captioners, args.scorers, args.actor_cpus, args.task_cpus)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    summary = capfilt_job(args.inputs, args.out, spec, fmt=args.format, endpoint=args.s3_endpoint,
                          tracking=Tracking(uri, args.experiment) if uri else None)
    rate = summary["original_kept_rate"]
    print(f"capfilt: {summary['shards_written']} shards written, {summary['shards_skipped']} there already, "
          f"{summary['samples']} samples in {args.out} ({summary['undecodable']} undecodable images passed through); "
          f"web caption kept for {'n/a' if rate is None else f'{100 * rate:.1f}%'}; "
          f"{summary['images_per_s'] or 0:.1f} images/s; summary: {args.out.rstrip('/')}/capfilt_summary.json")
    return 0

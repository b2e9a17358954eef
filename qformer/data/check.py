"""`qformer data check`: validate every annotation file and image a config refers to, and report.

Annotation problems are fatal in training (they raise before Ray starts), so here they are listed
per file instead; undecodable/missing images are listed with their reasons (training would skip them),
and a missing image folder is one line, not one per image. Either fails the check (exit 1) unless the
caller only wants the report.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from qformer.core.errors import AnnotationError
from qformer.core.progress import Progress
from qformer.data.builders import build_builder
from qformer.data.preflight import image_error, missing_image_root
from qformer.data.processors.text import pre_caption
from qformer.data.shard_check import SAMPLE_SHARDS, ShardReport, format_shard_report, shard_report


@dataclass
class SplitReport:
    dataset: str
    split: str
    annotation_file: str
    error: str | None = None
    records: int = 0
    captions: int = 0
    images: int = 0
    bad_images: list[str] = field(default_factory=list)  # "path: reason"
    words_min: int = 0
    words_mean: float = 0.0
    words_max: int = 0
    empty_captions: int = 0  # empty after blip_caption cleaning
    truncated_captions: int = 0  # over 50 words: cut by blip_caption
    missing_image_root: str | None = None  # the image folder, when it does not exist


def check_config(cfg, images: bool = True, workers: int | None = None, full: bool = False,
                 use_ray: bool = False) -> list[SplitReport]:
    """Reports per annotation split and per shard dataset. Shards: a seeded sample is read (`full`: all, on
    Ray tasks with `use_ray`) and compared with their metadata (qformer.data.shard_check)."""
    reports = []
    for name in cfg.datasets:
        builder = build_builder(cfg, name)
        if builder.is_sharded():
            reports.append(shard_report(name, builder.shard_set(), builder.ds_cfg.build_info.storage,
                                        sample=None if full else SAMPLE_SHARDS, workers=workers or 4, use_ray=use_ray))
            continue
        for split in builder.splits():
            path = builder.annotation_path(split)
            rep = SplitReport(name, split, str(path))
            reports.append(rep)
            try:
                records = builder.records(split)
            except AnnotationError as err:
                rep.error = str(err)
                continue
            caps = [c for r in records for c in r.captions]
            lengths = [len(pre_caption(c, max_words=10**9).split()) for c in caps]
            rep.records, rep.captions = len(records), len(caps)
            rep.words_min, rep.words_max = min(lengths), max(lengths)
            rep.words_mean = sum(lengths) / len(lengths)
            rep.empty_captions = sum(n == 0 for n in lengths)
            rep.truncated_captions = sum(n > 50 for n in lengths)
            paths = sorted({builder.image_path(r) for r in records})
            rep.images = len(paths)
            rep.missing_image_root = missing_image_root(builder, paths)
            if rep.missing_image_root:  # one line instead of every image "not found"
                rep.bad_images = [f"{p}: image directory missing" for p in paths
                                  if p.startswith(rep.missing_image_root.rstrip("/") + "/")]
            elif images:
                rep.bad_images = _check_images(paths, workers, f"data check {name}/{split}")
    return reports


def _check_images(paths: list[str], workers: int | None, label: str = "data check") -> list[str]:
    """'path: reason' of each image that does not decode, with progress (qformer.core.progress) as they are read."""
    workers = workers or min(8, os.cpu_count() or 1)
    results = []
    with Progress(len(paths), f"{label}: decode images", "images") as bar:
        if workers <= 1 or len(paths) < 256:
            for p in paths:
                results.append(image_error(p))
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                for r in pool.map(image_error, paths, chunksize=64):
                    results.append(r)
                    bar.update()
    return [r for r in results if r]


def failed(reports: list, images_fail: bool = True) -> bool:
    """True when a file is bad, a named shard missing or damaged, or (images_fail) when an image folder is
    missing or an image undecodable."""
    return any(bool(r.missing or r.damaged) if isinstance(r, ShardReport) else
               (r.error or (images_fail and (r.bad_images or r.missing_image_root))) for r in reports)


def format_report(reports: list, show: int = 20) -> str:
    lines = []
    shard_reports = [r for r in reports if isinstance(r, ShardReport)]
    for r in shard_reports:
        lines += format_shard_report(r, show)
    reports = [r for r in reports if not isinstance(r, ShardReport)]
    for r in reports:
        lines.append(f"{r.dataset}/{r.split}: {r.annotation_file}")
        if r.error:
            lines.append(f"  ERROR {r.error}")
            continue
        if r.missing_image_root:
            lines.append(f"  ERROR image directory {r.missing_image_root} does not exist "
                         f"(datasets.{r.dataset}.build_info.images.storage)")
        lines.append(f"  records {r.records}  captions {r.captions}  images {r.images}  undecodable {len(r.bad_images)}")
        lines.append(f"  caption words min/mean/max {r.words_min}/{r.words_mean:.1f}/{r.words_max}"
                     f"  empty {r.empty_captions}  over-50-words {r.truncated_captions}")
        for bad in [] if r.missing_image_root else r.bad_images[:show]:
            lines.append(f"  bad image {bad}")
        if len(r.bad_images) > show and not r.missing_image_root:
            lines.append(f"  ... and {len(r.bad_images) - show} more")
    bad_files = sum(1 for r in reports if r.error)
    bad_images = sum(len(r.bad_images) for r in reports)
    missing = len({r.missing_image_root for r in reports if r.missing_image_root})
    shards = (f", {sum(len(r.missing) for r in shard_reports)} missing shards, "
              f"{sum(len(r.damaged) for r in shard_reports)} damaged shards") if shard_reports else ""
    lines.append(f"summary: {len(reports) + len(shard_reports)} splits, {bad_files} bad annotation files, "
                 f"{bad_images} undecodable images, {missing} missing image folders{shards}")
    return "\n".join(lines)

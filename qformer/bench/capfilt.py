"""CapFilt throughput: images/s of the Ray Data job against a plain loop over the same models in one process.

Both caption, rank and write the same synthetic shards with the same models (default: the tiny random BLIP and
CLIP of qformer.data.capfilt.tiny; --captioner/--scorer for real ones) and the same batch size; both times
include loading the models (the job starts its actors when it runs). The plain loop also times each stage,
which is what sizes the actor pools and decode tasks per node (docs/capfilt.md). Outputs are checked equal.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from qformer.bench.common import write_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="2 shards of 8 images (CI smoke run)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=64, help="images per shard")
    parser.add_argument("--image-size", type=int, default=256, help="side of the synthetic JPEGs")
    parser.add_argument("--captioner", default=None, help="captioning model (default: a tiny random BLIP)")
    parser.add_argument("--scorer", default=None, help="CLIP model (default: a tiny random CLIP)")
    parser.add_argument("--num-captions", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actor-cpus", type=float, default=0.5, help="CPUs per actor (2 actors)")
    parser.add_argument("--task-cpus", type=float, default=0.5, help="CPUs per read/decode task")
    parser.add_argument("--out-dir", default=None, help="results directory (default experiments/benchmarks/results)")


def plain_loop(shards, out_dir: str, spec) -> dict[str, float]:
    """The job's stages called in order in this process, shard by shard; seconds per stage."""
    import numpy as np

    from qformer.data.capfilt.pipeline import ShardRows, output_names
    from qformer.data.capfilt.shards import read_rows, write_output
    from qformer.data.capfilt.stages import Captioner, Scorer, decode_batch, load_processor

    clock = {"load": 0.0, "read": 0.0, "decode": 0.0, "caption": 0.0, "score": 0.0, "write": 0.0}
    start = time.perf_counter()
    processors = (load_processor(spec.captioner, "captioner"), load_processor(spec.scorer, "scorer"))
    captioner = Captioner(spec.captioner, spec.num_captions, spec.top_p, spec.prompt)
    scorer = Scorer(spec.scorer, spec.keep)
    clock["load"] = time.perf_counter() - start
    for shard, name in enumerate(output_names(shards)):
        t = time.perf_counter()
        parts = list(read_rows({"shard": np.asarray([shard])}, shards, spec.seed))
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        clock["read"] += time.perf_counter() - t
        grouped = ShardRows()
        for lo in range(0, len(rows["shard"]), spec.batch_size):
            batch = {k: v[lo:lo + spec.batch_size] for k, v in rows.items()}
            for stage, fn in (("decode", lambda b: decode_batch(b, processors[0].image_processor,
                                                                processors[1].image_processor)),
                              ("caption", captioner), ("score", scorer)):
                t = time.perf_counter()
                batch = fn(batch)
                clock[stage] += time.perf_counter() - t
            for i in range(len(batch["shard"])):
                grouped.add(batch, i)
        t = time.perf_counter()
        write_output(out_dir, name, shards.format, *grouped.samples_and_stats())
        clock["write"] += time.perf_counter() - t
    return clock


def run(args: argparse.Namespace) -> dict:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import ray

    from qformer.core.logs import setup_logging
    from qformer.data.capfilt.pipeline import CapfiltSpec, run_capfilt
    from qformer.data.capfilt.tiny import write_tiny_captioner, write_tiny_scorer
    from qformer.data.shard_set import expand_shard_set
    from qformer.data.synth import caption_words
    from qformer.data.synth_shards import write_shards
    from qformer.jobs.ray_cluster import cluster_gpus, connect_ray_at

    setup_logging()
    n_shards, per_shard = (2, 8) if args.quick else (args.shards, args.per_shard)
    with tempfile.TemporaryDirectory(prefix="qformer-bench-capfilt-") as tmp:
        root = Path(tmp)
        captioner = args.captioner or str(write_tiny_captioner(root / "captioner", caption_words()))
        scorer = args.scorer or str(write_tiny_scorer(root / "scorer"))
        info = write_shards(root / "in", "wds", n_shards, per_shard, seed=0, image_size=args.image_size)
        shards = expand_shard_set("bench", [info["storage"]], "--in")
        spec = CapfiltSpec(captioner, scorer, num_captions=args.num_captions, batch_size=args.batch_size,
                           actor_cpus=args.actor_cpus, task_cpus=args.task_cpus)
        images = n_shards * per_shard
        start = time.perf_counter()
        stages = plain_loop(shards, str(root / "plain"), spec)
        plain_s = time.perf_counter() - start
        connect_ray_at(None)
        start = time.perf_counter()
        ray_run = run_capfilt(shards, str(root / "ray"), spec, cluster_gpus())
        ray_s = time.perf_counter() - start
        first = next(iter(ray_run.stats.values())).samples  # the shard written first: Python keeps dict order
        steady = (images - first) / (ray_run.seconds - ray_run.first_shard_s) if len(ray_run.stats) > 1 else None
        same = all((root / "plain" / n).read_bytes() == (root / "ray" / n).read_bytes() for n in ray_run.names)
        cpus = int(ray.cluster_resources().get("CPU", 0))
    payload = {
        "shards": n_shards, "images": images, "image_size": args.image_size, "num_captions": args.num_captions,
        "batch_size": args.batch_size, "captioner": args.captioner or "tiny random BLIP (2+2 layers, 32 px)",
        "scorer": args.scorer or "tiny random CLIP (2+2 layers, 32 px)", "ray_cpus": cpus,
        "plain_images_per_s": images / plain_s, "ray_images_per_s": images / ray_s,
        "ray_over_plain": plain_s / ray_s, "ray_after_first_shard_images_per_s": steady,
        "ray_first_shard_s": ray_run.first_shard_s, "plain_stage_s": {k: round(v, 3) for k, v in stages.items()},
        "plain_s": plain_s, "ray_s": ray_s, "outputs_identical": same,
    }
    path = write_result("capfilt", payload, args.out_dir)
    print(f"capfilt: Ray job {payload['ray_images_per_s']:.1f} images/s ({steady or 0:.1f} after its first shard, "
          f"{ray_run.first_shard_s:.1f} s), plain loop {payload['plain_images_per_s']:.1f} images/s (ratio "
          f"{payload['ray_over_plain']:.2f}); outputs identical: {same} -> {path}")
    return payload

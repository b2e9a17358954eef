"""End-to-end training throughput: samples/s of a short real run and the fraction of step time spent waiting for data.

One run of the real stack (Ray Data shards -> Ray Train worker(s) -> train step -> MLflow), with the
config's model and data (default: the demo's tiny model on the synthetic shapes set, generated if
missing). The loop measures, per log window, samples/s over all workers and the share of wall time
blocked on the next batch; the first window (start-up, pipeline warm-up) is reported separately from
the steady state. `end_to_end_samples_per_s` divides all samples by the whole fit() time, start-up included.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from qformer.bench.common import write_result
from qformer.config.batch_plan import worker_range
from qformer.core.logs import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg-path", default="experiments/demo/tiny_shapes.yaml")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="a few steps (CI smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 40; quick 6)")
    parser.add_argument("--out-dir", default=None, help="results directory (default experiments/benchmarks/results)")


def run(args: argparse.Namespace) -> dict:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)

    from qformer.config import load_config
    from qformer.jobs.demo import ensure_shapes_data
    from qformer.jobs.ray_cluster import connect_ray
    from qformer.jobs.train_job import launch_training
    from qformer.tracking.uri import mlflow_client

    setup_logging()
    steps = args.steps or (6 if args.quick else 40)
    windows = 3
    log_freq = max(1, steps // windows)
    with tempfile.TemporaryDirectory(prefix="qformer-bench-train-") as tmp:
        options = list(args.options) + [
            "run.max_epoch=1", f"run.max_steps_per_epoch={steps}", f"run.log_freq={log_freq}",
            "run.valid_splits=[]", "run.test_splits=[]", "run.save_freq_steps=0", f"run.output_dir={tmp}/out",
            f"run.mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "run.mlflow.experiment_name=qformer-bench-train",
        ]
        cfg = load_config(args.cfg_path, options)
        ensure_shapes_data(cfg) if "coco_caption" in cfg.datasets else None
        connect_ray(cfg)
        start = time.perf_counter()
        result = launch_training(cfg)
        wall = time.perf_counter() - start
        client = mlflow_client(result.tracking_uri)
        history = {key: sorted((m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, key))
                   for key in ("samples_per_s", "data_wait_frac")}
    world = max(1, worker_range(cfg.run.ray.num_workers)[1])
    done = int(result.metrics.get("step", 0))
    sps = [v for _, v in history["samples_per_s"]]
    wait = [v for _, v in history["data_wait_frac"]]
    steady_sps = sps[1:] or sps
    steady_wait = wait[1:] or wait
    payload = {
        "config": args.cfg_path, "options": list(args.options), "steps": done,
        "batch_size_per_worker": int(cfg.run.batch_size_train), "num_workers": world,
        "amp": bool(cfg.run.amp), "amp_dtype": str(cfg.run.amp_dtype),
        "samples_per_s": sum(steady_sps) / len(steady_sps) if steady_sps else None,
        "data_wait_frac": sum(steady_wait) / len(steady_wait) if steady_wait else None,
        "first_window": {"samples_per_s": sps[0] if sps else None, "data_wait_frac": wait[0] if wait else None},
        "windows": [{"step": s, "samples_per_s": v, "data_wait_frac": w}
                    for (s, v), (_, w) in zip(history["samples_per_s"], history["data_wait_frac"])],
        "fit_wall_s": wall,
        "end_to_end_samples_per_s": done * int(cfg.run.batch_size_train) * world / wall if wall else None,
    }
    path = write_result("train", payload, args.out_dir)
    print(f"train: {payload['samples_per_s']} samples/s (steady), data wait {payload['data_wait_frac']}, "
          f"{payload['end_to_end_samples_per_s']:.2f} samples/s end to end incl. start-up -> {path}")
    return payload

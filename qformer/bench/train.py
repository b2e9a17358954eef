"""End-to-end training throughput: samples/s of a short real run and the fraction of step time spent waiting for data.

One run of the real stack (Ray Data shards -> Ray Train worker(s) -> train step -> MLflow), with the
config's model and data (default: the demo's tiny model on the synthetic shapes set, generated if
missing). The loop measures, per log window, samples/s over all workers and the share of wall time
blocked on the next batch; the first window (start-up, pipeline warm-up) is reported separately from
the steady state. `end_to_end_samples_per_s` divides all samples by the whole fit() time, start-up included.

`--epochs N` splits the steps over N epochs and reports each later epoch's wait for its first batch
(`train_epoch/first_batch_wait_s`: Ray Data's per-pass start where nothing hid it). With
`--next-pass-baseline` the same run is made twice, back to back, with the two settings of
`run.data.next_pass_ahead`: the next epoch's pass started while this epoch's last step trains (today's
default) against each pass started when its epoch asks for it (the path before).
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
    parser.add_argument("--epochs", type=int, default=1, help="epochs the steps are split over (default 1)")
    parser.add_argument("--next-pass-baseline", action="store_true",
                        help="run twice: the next epoch's pass started ahead (default) and started when asked for")
    parser.add_argument("--out-dir", default=None, help="results directory (default experiments/benchmarks/results)")


def run(args: argparse.Namespace) -> dict:
    steps = args.steps or (6 if args.quick else 40)
    epochs = max(1, int(args.epochs))
    payload = _one_run(args, steps, epochs, [])
    if args.next_pass_baseline:
        fresh = _one_run(args, steps, epochs, ["run.data.next_pass_ahead=false"])
        payload["next_pass_baseline"] = {k: fresh[k] for k in ("first_batch_wait_s", "samples_per_s", "fit_wall_s")}
    path = write_result("train", payload, args.out_dir)
    waits = payload["first_batch_wait_s"]
    print(f"train: {payload['samples_per_s']} samples/s (steady), data wait {payload['data_wait_frac']}, "
          f"{payload['end_to_end_samples_per_s']:.2f} samples/s end to end incl. start-up"
          + (f"; first-batch wait of epochs 1+: {_seconds(waits[1:])}" if epochs > 1 else "")
          + (f" (each pass started when asked for: {_seconds(payload['next_pass_baseline']['first_batch_wait_s'][1:])})"
             if args.next_pass_baseline and epochs > 1 else "")
          + f" -> {path}")
    return payload


def _seconds(values: list) -> str:
    return ", ".join("-" if v is None else f"{v:.3f} s" for v in values) or "-"


def _one_run(args: argparse.Namespace, steps: int, epochs: int, extra: list[str]) -> dict:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.config import load_config
    from qformer.jobs.demo import ensure_shapes_data
    from qformer.jobs.ray_cluster import connect_ray
    from qformer.jobs.train_job import launch_training
    from qformer.tracking.uri import mlflow_client

    setup_logging()
    windows = 3
    log_freq = max(1, steps // windows)
    with tempfile.TemporaryDirectory(prefix="qformer-bench-train-") as tmp:
        options = list(args.options) + [
            f"run.max_epoch={epochs}", f"run.max_steps_per_epoch={max(1, steps // epochs)}", f"run.log_freq={log_freq}",
            "run.valid_splits=[]", "run.test_splits=[]", "run.save_freq_steps=0", f"run.output_dir={tmp}/out",
            f"run.mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "run.mlflow.experiment_name=qformer-bench-train",
            *extra,
        ]
        cfg = load_config(args.cfg_path, options)
        ensure_shapes_data(cfg) if "coco_caption" in cfg.datasets else None
        connect_ray(cfg)
        start = time.perf_counter()
        result = launch_training(cfg)
        wall = time.perf_counter() - start
        client = mlflow_client(result.tracking_uri)
        history = {key: sorted((m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, key))
                   for key in ("samples_per_s", "data_wait_frac", "train_epoch/first_batch_wait_s")}
    world = max(1, worker_range(cfg.run.ray.num_workers)[1])
    done = int(result.metrics.get("step", 0))
    sps = [v for _, v in history["samples_per_s"]]
    wait = [v for _, v in history["data_wait_frac"]]
    steady_sps = sps[1:] or sps
    steady_wait = wait[1:] or wait
    first_waits = dict(history["train_epoch/first_batch_wait_s"])
    return {
        "config": args.cfg_path, "options": list(args.options) + extra, "steps": done, "epochs": epochs,
        "batch_size_per_worker": int(cfg.run.batch_size_train), "num_workers": world,
        "amp": bool(cfg.run.amp), "amp_dtype": str(cfg.run.amp_dtype),
        "samples_per_s": sum(steady_sps) / len(steady_sps) if steady_sps else None,
        "data_wait_frac": sum(steady_wait) / len(steady_wait) if steady_wait else None,
        "first_window": {"samples_per_s": sps[0] if sps else None, "data_wait_frac": wait[0] if wait else None},
        "windows": [{"step": s, "samples_per_s": v, "data_wait_frac": w}
                    for (s, v), (_, w) in zip(history["samples_per_s"], history["data_wait_frac"])],
        # per epoch, as the loop logged it (MLflow step = epoch)
        "first_batch_wait_s": [first_waits.get(e) for e in range(epochs)],
        "fit_wall_s": wall,
        "end_to_end_samples_per_s": done * int(cfg.run.batch_size_train) * world / wall if wall else None,
    }

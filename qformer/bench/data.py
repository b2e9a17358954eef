"""Data loading: images/s per CPU core of the Ray Data pipeline vs a torch DataLoader, same transforms.

Both sides run the same work per sample: decode the JPEG (qformer.data.images.load_rgb), the config's
train vis processor (crop/flip[/RandAugment]) to uint8, blip_caption, and batched BERT tokenisation.
Both get the same number of worker processes (`--workers`, default: all CPUs) and the same batch
size, and are timed in the same run over the same files, epochs alternating between the two so that
load from other processes hits both alike. Each side runs `--epochs` passes; the first includes
start-up (worker processes, Ray Data planning), so the payload reports every epoch and the
steady-state rate (best epoch after the first). Data: the config's training annotations if they exist
on disk, else a synthetic set written to a temporary directory (`--synth-size` px JPEGs).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg-path", default="experiments/demo/tiny_shapes.yaml")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, for CI smoke runs)")
    parser.add_argument("--n-images", type=int, default=None, help="samples per epoch (default 2000; quick 128)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes on each side (default: CPUs)")
    parser.add_argument("--batch-size", type=int, default=None, help="default run.data.batch_size")
    parser.add_argument("--epochs", type=int, default=None, help="passes per side (default 3; quick 2)")
    parser.add_argument("--synth-size", type=int, default=256, help="side of the synthetic JPEGs when generated")
    parser.add_argument("--out-dir", default=None, help="results directory (default experiments/benchmarks/results)")


class _TorchDataset:
    """Map-style dataset doing what the Ray UDF does per sample (decode + vis + text processor)."""

    def __init__(self, rows: list[tuple[str, str, int]], spec) -> None:
        self.rows, self.spec = rows, spec
        self.rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from qformer.data.images import load_rgb

        if self.rng is None:  # one generator per worker process, fresh entropy (as the Ray UDF)
            self.rng = np.random.default_rng()
        path, caption, src = self.rows[i]
        image = self.spec.vis_processors[src](load_rgb(path), self.rng)
        return image, self.spec.text_processors[src](caption)


class _Collate:
    def __init__(self, spec) -> None:
        self.spec = spec

    def __call__(self, items):
        import torch

        from qformer.data.tokenizer import tokenize

        ids, atts = tokenize(self.spec.bert_model, [t for _, t in items], self.spec.max_txt_len)
        return {"image": torch.from_numpy(np.stack([im for im, _ in items])),
                "text_ids": torch.from_numpy(ids), "text_atts": torch.from_numpy(atts)}


def _time_epochs(make_iter, epochs: int) -> tuple[list[float], int]:
    times, n = [], 0
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for batch in make_iter():
            n += int(batch["image"].shape[0])
        times.append(time.perf_counter() - start)
    return times, n


def _summary(times: list[float], n: int, workers: int) -> dict:
    steady = min(times[1:]) if len(times) > 1 else times[0]
    return {"epoch_seconds": [round(t, 3) for t in times], "images_per_epoch": n,
            "images_per_s": n / steady, "images_per_s_per_core": n / steady / workers,
            "first_epoch_images_per_s": n / times[0]}


def _config(args, tmp: Path):
    from omegaconf import OmegaConf

    from qformer.config import load_config
    from qformer.data.pipeline import train_sources
    from qformer.data.synth import coco_caption_section, write_synthetic

    cfg = load_config(args.cfg_path, args.options)
    try:
        sources = train_sources(cfg)
        origin = "config"
    except Exception as err:  # annotations not on disk (e.g. the demo set was never written): synthesise
        print(f"bench data: config data unusable ({err}); using a synthetic set")
        n = args.n_images or (128 if args.quick else 2000)
        write_synthetic(tmp, n_train=max(1, n // 5 + 1), n_val=0, n_test=0, seed=0, image_size=args.synth_size)
        section = coco_caption_section(tmp)["coco_caption"]
        OmegaConf.set_struct(cfg, False)
        cfg.datasets = {"coco_caption": {**OmegaConf.to_container(cfg.datasets.get("coco_caption", {}) or {}), **section}}
        sources = train_sources(cfg)
        origin = f"synthetic {args.synth_size}px"
    return cfg, sources, origin


def run(args: argparse.Namespace) -> dict:
    import pandas as pd
    import ray
    import torch

    from qformer.bench.common import write_result
    from qformer.data.pipeline import to_ray_dataset, train_transform

    workers = args.workers or os.cpu_count() or 1
    epochs = args.epochs or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="qformer-bench-data-") as tmp:
        cfg, sources, origin = _config(args, Path(tmp))
        n = args.n_images or (128 if args.quick else 2000)
        rows = [(p, c, i) for i, (_, _, samples) in enumerate(sources) for p, c in samples][:n]
        bs = args.batch_size or int(cfg.run.data.batch_size)
        spec = train_transform(cfg, sources)

        # torch DataLoader: same transforms, `workers` persistent processes, forked before Ray starts
        loader = torch.utils.data.DataLoader(_TorchDataset(rows, spec), batch_size=bs, shuffle=True,
                                             num_workers=workers, collate_fn=_Collate(spec),
                                             persistent_workers=True)  # as Ray reuses its workers
        torch_times, torch_n = _time_epochs(lambda: iter(loader), 1)

        # Ray Data: same rows, `workers` concurrent decode tasks of 1 CPU each
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     object_store_memory=512 * 1024**2)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            cfg.run.data.batch_size = bs
            cfg.run.data.concurrency = workers
            cfg.run.data.num_cpus_per_task = 1.0
            ds = to_ray_dataset(pd.DataFrame(rows, columns=["path", "caption", "source"]), spec, cfg)
            ray_times: list[float] = []
            # epochs alternate between the two loaders so machine-load drift hits both alike
            for epoch in range(epochs):
                t, ray_n = _time_epochs(lambda: ds.iter_torch_batches(batch_size=bs, drop_last=False), 1)
                ray_times += t
                if epoch + 1 < epochs:
                    t, torch_n = _time_epochs(lambda: iter(loader), 1)
                    torch_times += t
        finally:
            del loader
            if started_ray:
                ray.shutdown()

    ray_s, torch_s = _summary(ray_times, ray_n, workers), _summary(torch_times, torch_n, workers)
    payload = {
        "config": args.cfg_path, "data": origin, "quick": bool(args.quick), "workers": workers, "batch_size": bs,
        "image_size": int(cfg.model.image_size), "vis_processors": [type(p).__name__ for p in spec.vis_processors],
        "ray_data": ray_s, "torch_dataloader": torch_s,
        "ratio_ray_vs_dataloader": ray_s["images_per_s"] / torch_s["images_per_s"],
    }
    path = write_result("data", payload, args.out_dir)
    print(f"data loading, {workers} workers, batch {bs}, {ray_n} images/epoch ({origin}):")
    print(f"  ray data    {ray_s['images_per_s']:8.1f} img/s  {ray_s['images_per_s_per_core']:7.1f} img/s/core  epochs {ray_s['epoch_seconds']}")
    print(f"  dataloader  {torch_s['images_per_s']:8.1f} img/s  {torch_s['images_per_s_per_core']:7.1f} img/s/core  epochs {torch_s['epoch_seconds']}")
    print(f"  ratio ray/dataloader {payload['ratio_ray_vs_dataloader']:.2f}  -> {path}")
    return payload

"""Annotation records -> streaming Ray Datasets for training, and retrieval splits for evaluation.

Training stream (per source or concatenated):
  driver: read + validate every annotation file (fails here, naming file and record) ->
  (path, caption, source) rows -> `EpochShuffledRows` (qformer.data.epoch_rows): every epoch a
  new full permutation of the rows, seeded by run.seed, cut into read tasks of ~run.data.task_rows
  rows, each with an augmentation seed from (run.seed, epoch, task) -> fused with
  `map_batches(train_batch)` on the same CPU task: decode each image in try/except, augment,
  tokenise ->
  rows {"image": uint8 [3,S,S], "text_ids", "text_atts": int64 [L]} -> Ray Train shards.

Shuffling: the rows are shuffled while they are still paths and captions, so a full per-epoch
shuffle (LAVIS: DistributedSampler with set_epoch) costs a permutation on the planning process,
not an all-to-all exchange of decoded images. A local shuffle buffer in the training workers
(`run.data.shuffle_buffer` rows) is therefore off by default; it would copy every image again.

Shards (any builder with `build_info.storage`): the driver keeps only the shard names;
`ShardStream` (qformer.data.shard_source) reads one shard per task, in a per-pass shard order, and
hands the same decode UDF chunks of rows whose `data` column holds the encoded image.

Where: the training loop writes each stream's pass and finished read units into a `StreamPlan`
(qformer.data.position) before it iterates; both sources read it when Ray plans the pass.

Paths: images are opened by whichever node runs a decode task, so on a multi-node cluster the data
root must be a shared mount at the same path on every node (NFS, a bucket mount), or object storage.

Mixing: with `run.train_dataset_ratios` null, all train sources (COCO + VG) form ONE dataset
"train" shuffled together, as LAVIS's ConcatDataset + DistributedSampler. With ratios, one dataset
per source; the training loop picks one source per batch by ratio (LAVIS runner_iter behaviour).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from qformer.core.errors import ConfigError
from qformer.data.builders import build_builder
from qformer.data.epoch_rows import epoch_shuffled_dataset
from qformer.data.processors.image import CLIP_MEAN, CLIP_STD
from qformer.data.retrieval import RetrievalSplit
from qformer.data.shard_set import ShardSet
from qformer.data.shard_source import shard_dataset
from qformer.data.stats import start_counter
from qformer.data.transform import AUG_SEED, TrainTransform, train_batch


@dataclass
class TrainData:
    """What the training loop consumes. `num_rows` counts captions BEFORE undecodable images are
    dropped, so a shard may end a little early: iterate until exhaustion, don't trust the count."""

    datasets: dict  # name -> ray.data.Dataset
    ratios: dict[str, float] | None
    num_rows: dict[str, int] = field(default_factory=dict)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD


def train_sources(cfg) -> list[tuple[str, object, list[tuple[str, str]] | ShardSet]]:
    """[(dataset name, builder, [(image path, raw caption), ...] or its ShardSet)] for run.train_splits;
    reads and validates every annotation file (AnnotationError names file and record). Shard sets are
    only listed here: their samples are read by the training stream."""
    sources = []
    for name in cfg.datasets:
        builder = build_builder(cfg, name)
        if builder.is_sharded():
            if "train" in cfg.run.train_splits:
                sources.append((name, builder, builder.shard_set()))
            continue
        samples = [s for split in cfg.run.train_splits if split in builder.splits() for s in builder.train_samples(split)]
        if samples:
            sources.append((name, builder, samples))
    if not sources:
        raise ConfigError(f"no dataset has a split among {list(cfg.run.train_splits)}", "run.train_splits")
    return sources


_train_sources = train_sources  # older name, used by learning


def train_transform(cfg, sources) -> TrainTransform:
    """The picklable per-source processing spec the decode UDF (and the benchmark's DataLoader) uses."""
    vis = tuple(b.processor("vis_processor", "train") for _, b, _ in sources)
    txt = tuple(b.processor("text_processor", "train") for _, b, _ in sources)
    return TrainTransform(vis, txt, str(cfg.model.bert_model), int(cfg.model.max_txt_len), int(cfg.model.image_size),
                          s3_endpoint=cfg.run.data.get("s3_endpoint"))


def task_pool(value):
    """run.data.concurrency (n, or [min, max]: tasks have no minimum) as the `compute` TaskPoolStrategy of a function
    map: what Ray Data made of `concurrency=` before deprecating it (2.51), without the warning line."""
    if value is None:
        return None
    import ray.data  # lazy: `qformer config` imports the data layer and must not import Ray

    return ray.data.TaskPoolStrategy(size=int(value if isinstance(value, int) else list(value)[-1]))


def rows_per_task(data_cfg) -> int:
    """run.data.task_rows rounded up to whole run.data.batch_size blocks (at least one)."""
    block = int(data_cfg.batch_size)
    return max(1, math.ceil(int(data_cfg.task_rows) / block)) * block


SHARD_CHUNK_BATCHES = 4


def shard_chunk_rows(data_cfg) -> int:
    """Rows a shard read task hands the decode map at a time (and a unit of its resume position).

    Read and decode fused (run.data.concurrency unset): 4 batches. A shard is one task whatever this is,
    so small chunks cost a UDF call and a Ray Data block each, and they keep the decode worker's memory and
    the first batch's wait independent of the shard size (`qformer bench data --source shards`: 1.17x the
    decode worker's peak from 100- to 10k-row tars, 3x before streaming). The per-block cost shows on tiny
    images only: 0.69x the table's img/s at 64 px, 0.95x at 224 px (chunks of ~8 MiB of decoded images
    cost less CPU but held 1.7x the memory). With a concurrency cap Ray Data runs the decode map as its own
    task per block, so chunks take run.data.task_rows rows to amortise Ray's per-task cost."""
    if data_cfg.concurrency is not None:
        return rows_per_task(data_cfg)
    return SHARD_CHUNK_BATCHES * int(data_cfg.batch_size)


def to_ray_dataset(rows: pd.DataFrame | ShardSet, spec: TrainTransform, cfg, stream: int = 0, name: str = "train",
                   plan=None):
    """Rows (path, caption, source), or a shard set, -> the lazy decode/augment/tokenise stream. `stream`
    tells apart the datasets of one run (one per source with run.train_dataset_ratios) in the seeds;
    `name` is the stream's key in `plan` (qformer.data.position), through which the training loop says
    which pass to read and what of it is done.

    Each task reads `rows_per_task` rows of this epoch's permutation and decodes them in one UDF
    call. Ray spends tens of ms per task (driver, raylet and worker CPU, plus a scheduling gap
    before the worker's next task; `qformer bench data`), comparable to decoding 32 small images,
    so tasks take hundreds of rows. With run.data.concurrency unset, Ray Data fuses the read into
    the decode task; a concurrency cap keeps them apart (Ray Data does not fuse a capped map), which
    costs one small read task per decode task."""
    data_cfg = cfg.run.data
    num_cpus = float(data_cfg.num_cpus_per_task)
    if isinstance(rows, ShardSet):
        ds = shard_dataset(rows, stream, shard_chunk_rows(data_cfg), (int(cfg.run.seed), stream), plan=plan,
                           stream=name, num_cpus=num_cpus, shuffle_buffer=int(data_cfg.shard_shuffle_buffer))
    else:
        table = pa.Table.from_pandas(rows[["path", "caption", "source"]], preserve_index=False)
        ds = epoch_shuffled_dataset(table, rows_per_task(data_cfg), (int(cfg.run.seed), stream), num_cpus=num_cpus,
                                    seed_column=AUG_SEED, plan=plan, stream=name)
    kwargs = {}
    if data_cfg.concurrency is not None:
        kwargs["compute"] = task_pool(data_cfg.concurrency)
    # batch_size=None: the whole read block in one call (an int batch size also stops the fusion)
    ds = ds.map_batches(train_batch, fn_kwargs={"spec": spec}, batch_size=None, batch_format="numpy",
                        num_cpus=num_cpus, **kwargs)
    # Ray Data merges a task's outputs into blocks of up to 128 MiB before the first leaves the worker: a task
    # reading a 10k-row shard held all of it decoded, and training waited for the whole shard. Blocks of one
    # decoded chunk leave as each chunk is done (this dataset's own context: the global one is untouched).
    chunk = shard_chunk_rows(data_cfg) if isinstance(rows, ShardSet) else rows_per_task(data_cfg)
    side = int(spec.image_size)
    ds.context.target_max_block_size = min(ds.context.target_max_block_size or 128 * 1024**2,
                                           max(1024**2, chunk * 3 * side * side))
    return ds


def _check_ratios(ratios, names: list[str]) -> dict[str, float]:
    out = {}
    for key, value in dict(ratios).items():
        if key not in names:
            raise ConfigError(f"no training dataset '{key}' (have: {', '.join(names)})", f"run.train_dataset_ratios.{key}")
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"ratio must be a positive number, got {value!r}", f"run.train_dataset_ratios.{key}")
        out[key] = float(value)
    missing = [n for n in names if n not in out]
    if missing:
        raise ConfigError(f"no ratio for training dataset(s) {', '.join(missing)}", "run.train_dataset_ratios")
    return out


def build_train_datasets(cfg, sources=None, plan=None) -> TrainData:
    """Validate annotations (or take `train_sources(cfg)` already read), then return lazy streaming
    datasets (nothing is decoded yet). `plan`: the run's StreamPlan actor (qformer.data.position)."""
    sources = train_sources(cfg) if sources is None else sources
    spec = train_transform(cfg, sources)
    mean, std = spec.vis_processors[0].mean, spec.vis_processors[0].std
    for (name, _, _), proc in zip(sources, spec.vis_processors):
        if (proc.mean, proc.std) != (mean, std):  # one normalisation per batch, on the device
            raise ConfigError(f"mean/std differ from {sources[0][0]}'s; all training datasets must share them",
                              f"datasets.{name}.vis_processor.train")
    rows: list[pd.DataFrame | ShardSet] = []
    for i, (_, _, samples) in enumerate(sources):
        if isinstance(samples, ShardSet):
            rows.append(samples)
            continue
        df = pd.DataFrame(samples, columns=["path", "caption"])
        df["source"] = np.int64(i)
        rows.append(df)
    start_counter()
    names = [name for name, _, _ in sources]
    ratios_cfg = cfg.run.get("train_dataset_ratios")
    if not ratios_cfg:
        if any(isinstance(r, ShardSet) for r in rows) and len(rows) > 1:
            raise ConfigError(f"several training datasets ({', '.join(names)}) include shards: mix them with "
                              "run.train_dataset_ratios", "run.train_dataset_ratios")
        one = rows[0] if isinstance(rows[0], ShardSet) else pd.concat(rows, ignore_index=True)
        size = _size(one)
        return TrainData({"train": to_ray_dataset(one, spec, cfg, plan=plan)}, None,
                         {"train": size} if size is not None else {}, mean, std)
    ratios = _check_ratios(ratios_cfg, names)
    sizes = {name: _size(r) for name, r in zip(names, rows)}
    unknown = [n for n, size in sizes.items() if size is None]
    if unknown and not cfg.run.get("max_iters") and not cfg.run.get("max_steps_per_epoch"):
        raise ConfigError("an epoch of datasets mixed by run.train_dataset_ratios is sized by their samples: give "
                          "the shards' count, or use runner_iter (max_iters)", f"datasets.{unknown[0]}.build_info.num_samples")
    datasets = {name: to_ray_dataset(r, spec, cfg, stream=i, name=name, plan=plan)
                for i, (name, r) in enumerate(zip(names, rows))}
    return TrainData(datasets, ratios, {n: size for n, size in sizes.items() if size is not None}, mean, std)


def _size(rows: pd.DataFrame | ShardSet) -> int | None:
    return rows.num_samples if isinstance(rows, ShardSet) else len(rows)


def build_eval_split(cfg, split: str) -> RetrievalSplit:
    """`<dataset>/<split>` (e.g. flickr30k/test beside COCO's test), or a plain split name that exactly one
    dataset has (LAVIS: non-train splits must have exactly one dataset)."""
    name, _, split = split.rpartition("/")
    having = []
    for dataset in [name] if name else cfg.datasets:
        if dataset not in cfg.datasets:
            raise ConfigError(f"'{dataset}/{split}' names no configured dataset ({', '.join(cfg.datasets)})", "datasets")
        builder = build_builder(cfg, dataset)
        if split in builder.splits():
            having.append(builder)
    if not having:
        raise ConfigError(f"no dataset has a '{split}' split", f"datasets.{name}" if name else "datasets")
    if len(having) > 1:
        names = ", ".join(b.name for b in having)
        raise ConfigError(f"split '{split}' is in several datasets ({names}); evaluation takes exactly one: "
                          f"name it as <dataset>/{split}", "datasets")
    return having[0].retrieval_split(split)

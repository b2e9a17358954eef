"""The frozen-ViT feature cache job: `cache_features(cfg, out_dir, views)` writes the whole cache for a
config's training data (the format and the reader live in qformer.features).

Reads each training source's (image, caption) samples through the data builders, then a Ray Data batch
job over the unique images, streamed in two stages: CPU tasks decode each image and make its K views
(uint8), then an actor pool holding the frozen ViT (one GPU per actor when the cluster has GPUs) encodes
them and writes one fp16 shard per batch; actors return only the small index rows (image, shard, row).
Last, each source's records (token ids + where the image's features live) and then the manifest are
written, so a directory with a manifest is a complete cache.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray

from qformer.core.errors import ConfigError, ImageDecodeError
from qformer.core.progress import Progress
from qformer.data.builders import build_builder
from qformer.data.images import load_rgb
from qformer.data.tokenizer import tokenize
from qformer.features import store
from qformer.features.encoder import EncoderFactory
from qformer.features.manifest import build_manifest, write_manifest
from qformer.features.views import ViewMaker
from qformer.jobs.ray_cluster import cluster_gpus

log = logging.getLogger("qformer.features")


# (uint8 [B,3,S,S] NumPy) -> float [B,N,D] (NumPy or torch); built inside each actor.
Encoder = Callable[[np.ndarray], Any]


@dataclass
class CacheJobResult:
    index: dict[str, tuple[str, int]]           # image path -> (shard name, row)
    skipped: list[str] = field(default_factory=list)  # images that could not be decoded
    feature_shape: tuple[int, int] = (0, 0)      # (N, D)
    vit_fingerprint: str = ""                    # identical across actors (checked)


def _decode_views(batch: dict[str, np.ndarray], view_makers: dict[str, ViewMaker]) -> dict[str, np.ndarray]:
    """CPU stage: image path -> K uint8 views; undecodable images get ok=False (skipped, not fatal)."""
    pixels, ok = [], []
    shape = None
    for idx, path, source in zip(batch["image_idx"], batch["image"], batch["source"]):
        try:
            views = view_makers[str(source)](load_rgb(str(path)), int(idx))
        except ImageDecodeError:  # a corrupt/missing image is skipped and listed in the manifest
            pixels.append(None)
            ok.append(False)
            continue
        shape = views.shape
        pixels.append(views)
        ok.append(True)
    k = next(iter(view_makers.values())).views
    fill = np.zeros(shape or (k, 3, 1, 1), dtype=np.uint8)
    pixels = [p if p is not None else fill for p in pixels]
    return {"image_idx": batch["image_idx"], "image": batch["image"],
            "pixels": np.stack(pixels), "ok": np.asarray(ok, dtype=bool)}


class FeatureWriter:
    """Actor-pool stage: holds the frozen ViT, encodes a batch of views, writes one shard."""

    def __init__(self, cache_dir: str, make_encoder: Callable[[], Encoder], encode_batch: int = 64):
        self.cache_dir = cache_dir
        self.encode = make_encoder()
        self.encode_batch = int(encode_batch)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"].astype(bool)
        paths = batch["image"]
        n = int(ok.sum())
        shard_names = np.full(len(ok), "", dtype=object)
        rows = np.full(len(ok), -1, dtype=np.int32)
        if n:
            pixels = batch["pixels"][ok]                       # [n, K, 3, S, S]
            k = pixels.shape[1]
            flat = pixels.reshape(n * k, *pixels.shape[2:])
            feats = np.concatenate([self._encode(flat[i:i + self.encode_batch])
                                    for i in range(0, len(flat), self.encode_batch)])
            feats = feats.reshape(n, k, *feats.shape[1:])
            name = store.write_shard(self.cache_dir, feats, int(batch["image_idx"][ok][0]))
            shard_names[ok] = name
            rows[ok] = np.arange(n, dtype=np.int32)
        fingerprint = str(getattr(self.encode, "fingerprint", ""))
        return {"image": paths, "shard": shard_names.astype(str), "row": rows,
                "vit_fingerprint": np.full(len(ok), fingerprint, dtype=object).astype(str)}

    def _encode(self, chunk: np.ndarray) -> np.ndarray:
        out = self.encode(chunk)
        if hasattr(out, "detach"):  # torch tensor
            out = out.detach().float().cpu().numpy()
        out = np.asarray(out, dtype=np.float32)
        if not np.isfinite(out).all():
            raise FloatingPointError("the ViT produced non-finite features; check vit_precision/weights")
        # fp16 keeps ViT-g features within range (|x| << 65504) and halves storage.
        return out.astype(np.float16)


def run_cache_job(
    images: list[tuple[str, str]],
    cache_dir: str | Path,
    view_makers: dict[str, ViewMaker],
    make_encoder: Callable[[], Encoder],
    *,
    batch_size: int = 32,
    actors: int | None = None,
    use_gpu: bool | None = None,
    cpus_per_actor: float = 1.0,
    decode_cpus: float = 1.0,
) -> CacheJobResult:
    """Encode every (source, image path) (deduplicated, in order) and write its shards under cache_dir.

    Each source has its own ViewMaker (LAVIS lets datasets use different train transforms).
    `use_gpu=None` means: GPU actors when the connected Ray cluster has GPUs. Returns the index
    keyed by image path; the caller writes images.parquet and the manifest.
    """
    if not ray.is_initialized():
        raise RuntimeError("run_cache_job needs a connected Ray cluster (ray.init)")
    # Cache keys are image paths: an image shared by two sources is encoded once, with the first's views.
    first_source: dict[str, str] = {}
    for source, path in images:
        first_source.setdefault(str(path), str(source))
    unique = [(s, p) for p, s in first_source.items()]
    if {s for s, _ in unique} - set(view_makers):
        raise ValueError(f"no ViewMaker for sources {sorted({s for s, _ in unique} - set(view_makers))}")
    if not unique:
        raise ValueError("no images to cache")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    gpus = cluster_gpus()
    if use_gpu is None:
        use_gpu = gpus > 0
    pool = actors or (max(gpus, 1) if use_gpu else 1)
    # One input block per batch so the decode stage runs as parallel tasks.
    ds = ray.data.from_items([{"image_idx": i, "image": p, "source": s} for i, (s, p) in enumerate(unique)],
                             override_num_blocks=max(1, -(-len(unique) // batch_size)))
    ds = ds.map_batches(_decode_views, fn_kwargs={"view_makers": view_makers}, batch_size=batch_size,
                        num_cpus=decode_cpus, batch_format="numpy")
    ds = ds.map_batches(FeatureWriter, fn_constructor_args=(str(cache_dir), make_encoder),
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=pool), num_gpus=1 if use_gpu else 0,
                        num_cpus=cpus_per_actor, batch_format="numpy")
    index: dict[str, tuple[str, int]] = {}
    skipped: list[str] = []
    fingerprints: set[str] = set()
    with Progress(len(unique), "cache-features: encode images", "images") as bar:
        for out in ds.iter_batches(batch_format="numpy", batch_size=None):
            fingerprints.update(str(f) for f in out["vit_fingerprint"])
            for path, shard, row in zip(out["image"], out["shard"], out["row"]):
                if int(row) < 0:
                    skipped.append(str(path))
                else:
                    index[str(path)] = (str(shard), int(row))
            bar.update(len(out["image"]))
    if not index:
        raise RuntimeError(f"no image could be decoded (first: {unique[0][1]})")
    if len(fingerprints) > 1:  # e.g. randomly initialised ViTs seeded differently per actor
        raise RuntimeError(f"actors encoded with different ViT weights (fingerprints {sorted(fingerprints)})")
    first_shard, _ = next(iter(index.values()))
    shape = store.ShardReader(cache_dir).shard(first_shard).shape[2:]
    return CacheJobResult(index=index, skipped=sorted(skipped), feature_shape=tuple(int(x) for x in shape),
                          vit_fingerprint=fingerprints.pop() if fingerprints else "")


def _samples(cfg: Any) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for name in cfg.datasets:
        builder = build_builder(cfg, str(name))
        pairs = [pair for split in cfg.run.train_splits if split in builder.splits()
                 for pair in builder.train_samples(split)]
        if pairs:  # as qformer.data.pipeline: sources without train samples take no part
            out[str(name)] = pairs
    return out


def _view_makers(cfg: Any, sources: list[str], views: int, seed: int) -> dict[str, ViewMaker]:
    makers = {}
    for name in sources:
        builder = build_builder(cfg, str(name))
        train = builder.processor("vis_processor", "train") if views > 1 else None
        makers[str(name)] = ViewMaker(builder.processor("vis_processor", "eval"), train, views, seed)
    return makers


def cache_features(cfg: Any, out_dir: str | Path, views: int = 1, *, batch_size: int = 32,
                   actors: int | None = None, use_gpu: bool | None = None, overwrite: bool = False,
                   make_encoder: Callable[[], Encoder] | None = None) -> dict[str, Any]:
    """Build the cache; returns the manifest. Needs a connected Ray cluster."""
    out = Path(out_dir).expanduser().resolve()
    if (out / store.MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a feature cache; pass overwrite=True (--overwrite) to replace it")
    if out.exists() and overwrite:
        shutil.rmtree(out)
    if views < 1:
        raise ConfigError(f"--views must be >= 1, got {views}", key="views")
    seed = int(cfg.run.seed)
    samples = _samples(cfg)
    if not any(samples.values()):
        raise ConfigError("no training samples in any dataset's train splits", key="run.train_splits")
    images = [(source, path) for source, pairs in samples.items() for path, _ in pairs]
    result: CacheJobResult = run_cache_job(images, out, _view_makers(cfg, list(samples), views, seed),
                                           make_encoder or EncoderFactory(cfg), batch_size=batch_size,
                                           actors=actors, use_gpu=use_gpu)
    keys = sorted(result.index)
    store.write_images_index(out, keys, [result.index[k][0] for k in keys], [result.index[k][1] for k in keys])
    counts: dict[str, int] = {}
    for source, pairs in samples.items():
        text_proc = build_builder(cfg, source).processor("text_processor", "train")
        kept = [(p, c) for p, c in pairs if p in result.index]  # skipped images lose their records, as online
        ids, atts = tokenize(str(cfg.model.bert_model), [text_proc(c) for _, c in kept], int(cfg.model.max_txt_len))
        store.write_records(out, source, [result.index[p][0] for p, _ in kept],
                            [result.index[p][1] for p, _ in kept], ids, atts)
        counts[source] = len(kept)
    manifest = build_manifest(cfg, views, seed, counts, len(result.index), result.feature_shape, result.skipped)
    manifest["vit_fingerprint"] = result.vit_fingerprint
    write_manifest(out, manifest)
    if result.skipped:
        log.warning("feature cache: %d undecodable images skipped (listed in %s)", len(result.skipped),
                    out / store.MANIFEST)
    return manifest

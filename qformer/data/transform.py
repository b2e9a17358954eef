"""The Ray Data map_batches UDFs: decode each image in try/except, process, tokenise.

One corrupt file must cost one sample, not the dataset (`read_images` fails everything) nor a block
(`max_errored_blocks` drops whole blocks of good images), so decoding happens per image here and
failures are dropped from the batch and counted (qformer.data.stats). Images leave as uint8.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from qformer.core.errors import ImageDecodeError
from qformer.data.images import DEFAULT_MAX_PIXELS, open_encoded
from qformer.data.position import ROW, UNIT, UNIT_ROWS, unit_key
from qformer.data.stats import record_skipped
from qformer.data.tokenizer import tokenize


@dataclass(frozen=True)
class TrainTransform:
    """Everything a worker needs, picklable: per-source processors, tokenizer name and length."""

    vis_processors: tuple  # indexed by the row's `source`
    text_processors: tuple
    bert_model: str
    max_txt_len: int
    image_size: int
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # decompression-bomb limit (None: Pillow's own guard only)
    s3_endpoint: str | None = None  # for image paths that are s3:// URIs (run.data.s3_endpoint)


def exact_transform(spec: TrainTransform) -> TrainTransform:
    """`spec` with LAVIS's exact pixels (run.data.train_decode: exact), e.g. to measure the reduced decode against."""
    def exact(proc):
        proc = copy.copy(proc)
        proc.reduced_decode = False
        return proc

    return dataclasses.replace(spec, vis_processors=tuple(exact(p) for p in spec.vis_processors))


AUG_SEED = "aug_seed"  # column the training read adds: one seed per task, from (run.seed, epoch, task)


def _rng(batch: dict[str, np.ndarray]) -> np.random.Generator:
    """The task's augmentation generator: from its aug_seed (reproducible per run.seed, new each
    epoch), else fresh entropy."""
    seeds = batch.get(AUG_SEED)
    return np.random.default_rng(int(seeds[0]) if seeds is not None and len(seeds) else None)


def _unit_of(batch: dict[str, np.ndarray], i: int) -> str | None:
    """Row i's read unit key for the lost-sample ledger (None for rows read without positions)."""
    if UNIT not in batch or AUG_SEED not in batch:
        return None
    return unit_key(batch[AUG_SEED][i], batch[UNIT][i])


def train_batch(batch: dict[str, np.ndarray], spec: TrainTransform) -> dict[str, np.ndarray]:
    """{"path", "caption", "source"[, "data", "aug_seed", "unit", "unit_row", "unit_rows"]} ->
    {"image" uint8 [n,3,S,S], "text_ids", "text_atts" int64 [n,L][, "unit", "unit_row", "unit_rows"]}.
    `data` holds encoded image bytes read from a shard (then `path` only names the sample); a null entry
    means: open `path`. A read chunk reaches this in one call, so `unit_rows` becomes the number of its
    rows that survive decoding."""
    rng = _rng(batch)
    images, texts, kept, skipped = [], [], [], {}
    data = batch.get("data")
    for i, (path, caption, source) in enumerate(zip(batch["path"], batch["caption"], batch["source"])):
        try:  # the processor decodes (only the pixels it needs, with run.data.train_decode: reduced)
            encoded = open_encoded(path, spec.max_pixels, data=data[i] if data is not None else None,
                                   endpoint=spec.s3_endpoint)
            image = spec.vis_processors[int(source)].process(encoded, rng)
        except ImageDecodeError as err:
            skipped.setdefault(_unit_of(batch, i), []).append(str(err))
            continue
        images.append(image)
        texts.append(spec.text_processors[int(source)](str(caption)))
        kept.append(i)
    for unit, messages in skipped.items():  # by read unit: a unit read again reports the same, not more
        record_skipped(messages, unit=unit)
    ids, atts = tokenize(spec.bert_model, texts, spec.max_txt_len)
    s = spec.image_size
    image = np.stack(images) if images else np.zeros((0, 3, s, s), np.uint8)
    out = {"image": image, "text_ids": ids, "text_atts": atts}
    if UNIT in batch:
        units = np.asarray(batch[UNIT], np.int64)[kept]
        _, inverse, counts = np.unique(units, return_inverse=True, return_counts=True)
        out[UNIT], out[UNIT_ROWS] = units, counts[inverse].astype(np.int64)
        out[ROW] = np.asarray(batch[ROW], np.int64)[kept]
    return out


def eval_batch(batch: dict[str, np.ndarray], processor, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """{"index", "path"} -> {"index" int64, "image" uint8 [n,3,S,S]}; undecodable images dropped+counted."""
    indices, images, skipped = [], [], []
    for index, path in zip(batch["index"], batch["path"]):
        try:
            image = processor.process(open_encoded(os.fspath(path), max_pixels))
        except ImageDecodeError as err:
            skipped.append(str(err))
            continue
        indices.append(int(index))
        images.append(image)
    record_skipped(skipped)
    s = processor.image_size
    image = np.stack(images) if images else np.zeros((0, 3, s, s), np.uint8)
    return {"index": np.asarray(indices, dtype=np.int64), "image": image}

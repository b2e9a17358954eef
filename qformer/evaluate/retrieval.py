"""Image-text retrieval of a Blip2Qformer on an eval split: LAVIS `compute_sim_matrix` + `_report_metrics` (spec §6).

Steps (each rank of a process group does its share; a single process does everything):
1. texts: tokenised with max_length 35 (LAVIS eval; training uses 32); each rank encodes a contiguous share
   (L2-normed text_proj of the [CLS] of a text-only pass) and the shares are all-gathered;
2. images: each rank encodes its contiguous share of images (query outputs -> L2-normed vision_proj, [N,Q,E];
   also keeps its own images' ln_vision tokens for ITM) and the query embeddings are all-gathered;
3. coarse sims[i, t] = max over queries of the cosine (no temperature), on every rank;
4. ITM re-rank (qformer.evaluate.rerank): each rank scores the top-k_test pairs whose image it owns,
   score = mean-over-queries positive ITM logit + sim, everything else -100; entries all-gathered;
5. metrics (qformer.evaluate.metrics) on every rank, so all ranks return the same dict.
The result does not depend on the number of ranks (tested: 2 gloo workers == 1 process).

Deviations from LAVIS, none changing a ranking: k_test is clamped to the candidate count (LAVIS crashes);
the score matrices of a multi-rank run hold -100 outside the re-ranked entries, exactly like a single
process (LAVIS's all_reduce(SUM) adds a constant -100*(world-1) offset per row).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist

from qformer.core.progress import Progress
from qformer.data.normalize import normalize_uint8
from qformer.data.transform import eval_batch
from qformer.evaluate.distributed import gather_entries, gather_shards, resolve_rank_world, shard_range
from qformer.evaluate.metrics import retrieval_metrics
from qformer.evaluate.rerank import coarse_similarity, itm_rerank

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

log = logging.getLogger(__name__)

EVAL_MAX_TXT_LEN = 35  # LAVIS compute_sim_matrix tokenises with max_length=35


class RetrievalData(Protocol):
    """What evaluation needs from an eval split (qformer.data.retrieval.RetrievalSplit provides it)."""

    image_paths: Sequence[str]
    texts: Sequence[str]
    img2txt: Sequence[Sequence[int]]
    txt2img: Sequence[int]
    vis_processor: Any  # eval image processor (uint8 [3,S,S] out)


@dataclass
class ScoreMatrices:
    """LAVIS's (score_i2t, score_t2i) plus the ground truth they are indexed by.

    Images that could not be decoded are left out together with their captions (and counted), so the
    ground truth here can be a re-indexed subset of the split's.
    """

    i2t: np.ndarray  # [N_img, N_txt]
    t2i: np.ndarray  # [N_txt, N_img]
    img2txt: list[list[int]]
    txt2img: list[int]
    skipped_images: int = 0
    kept_images: list[int] = field(default_factory=list)  # row i of i2t is the split's image kept_images[i]
    kept_texts: list[int] = field(default_factory=list)  # row t of t2i is the split's text kept_texts[t]


def _image_batches(split: Any, rows: range, batch_size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(rows read, indices, eval-processed uint8 [b,3,S,S]) for split rows `rows`; undecodable images are
    absent from the indices."""
    paths = split.image_paths
    for lo in range(rows.start, rows.stop, batch_size):
        hi = min(rows.stop, lo + batch_size)
        batch = {"index": np.arange(lo, hi, dtype=np.int64), "path": np.array(paths[lo:hi], dtype=object)}
        out = eval_batch(batch, split.vis_processor, getattr(split, "max_pixels", None))
        yield hi - lo, out["index"], out["image"]


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def compute_score_matrices(
    model: torch.nn.Module,
    split: RetrievalData,
    *,
    k_test: int,
    batch_size: int,
    device: torch.device | str,
    rank: int | None = None,
    world_size: int | None = None,
    itm_batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    label: str = "retrieval eval",
) -> ScoreMatrices:
    """LAVIS's compute_sim_matrix: ITC sims + ITM re-rank of the top k_test, on every rank.

    Rank 0 shows the progress of each stage (texts, images, ITM pairs) under `label` (qformer.core.progress).
    """
    rank, world_size = resolve_rank_world(rank, world_size)
    device = torch.device(device)
    core = getattr(model, "module", model)  # DDP-wrapped in the training loop
    texts = list(split.texts)
    n_img, n_txt = len(split.image_paths), len(texts)
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"eval split has {n_img} images and {n_txt} texts; retrieval needs both")
    if len(split.img2txt) != n_img or len(split.txt2img) != n_txt:
        raise ValueError("eval split: img2txt/txt2img lengths do not match image_paths/texts")
    mean = getattr(split, "mean", CLIP_MEAN)
    std = getattr(split, "std", CLIP_STD)

    def cast() -> contextlib.AbstractContextManager:
        # autocast only around model calls; similarities and score sums stay fp32 (LAVIS has no autocast here)
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    with _eval_mode(core):
        # 1. texts: every rank tokenises all (ITM may pair any text with its images), encodes its share
        ids_l, atts_l = [], []
        for lo in range(0, n_txt, batch_size):
            ids, atts = core.tokenize(texts[lo : lo + batch_size], max_length=EVAL_MAX_TXT_LEN)
            ids_l.append(ids.cpu())
            atts_l.append(atts.cpu())
        text_ids, text_atts = torch.cat(ids_l), torch.cat(atts_l)
        my_txt = shard_range(n_txt, rank, world_size)
        local_text: list[torch.Tensor | None] = []
        with Progress(len(my_txt), f"{label}: encode texts", "texts", enabled=rank == 0) as bar:
            for lo, hi in _batches(my_txt, batch_size):
                with cast():
                    local_text.extend(core.encode_text(text_ids[lo:hi].to(device), text_atts[lo:hi].to(device)).float())
                bar.update(hi - lo)
        text_feats = gather_shards(_stack_rows(local_text, device), n_txt, world_size)

        # 2. images: this rank's share. Their ln_vision tokens stay on the device, in the autocast dtype the ITM
        # pass casts them to anyway (same scores, half the memory: 0.72 MB per ViT-g image): LAVIS keeps them on
        # the CPU and copies k_test repeats of one image per re-rank, a host->device copy per ITM batch
        my_img = shard_range(n_img, rank, world_size)
        feats_by_row: list[torch.Tensor | None] = [None] * len(my_img)
        local_vit = []
        with Progress(len(my_img), f"{label}: encode images", "images", enabled=rank == 0) as bar:
            for read, idx, images in _image_batches(split, my_img, batch_size):
                bar.update(read)
                if len(idx) == 0:
                    continue
                image = normalize_uint8(torch.as_tensor(images).to(device), mean, std)
                with cast():
                    feats, embeds_ln = core.encode_image(image=image)
                for j, row in enumerate(idx):
                    feats_by_row[int(row) - my_img.start] = feats[j].float()
                local_vit.append(embeds_ln.to(autocast_dtype or embeds_ln.dtype))
        valid_local = torch.tensor([f is not None for f in feats_by_row], dtype=torch.uint8, device=device)
        valid = gather_shards(valid_local, n_img, world_size).bool().cpu()
        image_feats = gather_shards(_stack_rows(feats_by_row, device), n_img, world_size)
        vit = torch.cat(local_vit) if local_vit else None

        # undecodable images (and their captions) leave the evaluation, identically on every rank
        gt = _restrict(split, valid)
        image_feats = image_feats[valid.to(image_feats.device)]
        keep_txt = torch.as_tensor(gt.kept_texts, dtype=torch.long)
        text_feats = text_feats[keep_txt.to(text_feats.device)]
        text_ids, text_atts = text_ids[keep_txt].to(device), text_atts[keep_txt].to(device)  # once, for the ITM pairs
        compact_start = int(valid[: my_img.start].sum())
        owned = range(compact_start, compact_start + int(valid[my_img.start : my_img.stop].sum()))

        # 3. coarse sims, 4. ITM re-rank of the pairs whose image this rank owns
        sims = coarse_similarity(image_feats, text_feats)

        def itm_scorer(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
            with cast():  # pairs, tokens and texts all on the device: nothing crosses per batch
                return core.itm_logit(vit[img_idx - owned.start], text_ids[txt_idx], text_atts[txt_idx]).float()

        def itm_progress(total: int) -> Progress:
            return Progress(total, f"{label}: ITM re-rank", "pairs", enabled=rank == 0)

        entries = itm_rerank(sims, k_test, itm_scorer, owned_images=owned, batch_size=itm_batch_size or batch_size,
                             progress=itm_progress)
    i2t, t2i = gather_entries(entries, world_size).to_dense(*sims.shape)
    kept_images = [i for i, ok in enumerate(valid.tolist()) if ok]
    return ScoreMatrices(i2t, t2i, gt.img2txt, gt.txt2img, skipped_images=int((~valid).sum()),
                         kept_images=kept_images, kept_texts=list(gt.kept_texts))


def _batches(rows: range, batch_size: int) -> Iterator[tuple[int, int]]:
    for lo in range(rows.start, rows.stop, batch_size):
        yield lo, min(rows.stop, lo + batch_size)


def _stack_rows(rows: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """This rank's encoded rows as one tensor, zeros where nothing was encoded (undecodable image).

    Every rank must pass the same trailing shape to the gather, so a rank with nothing encoded (empty
    share) learns the shape from the others (a tiny all_reduce).
    """
    first = next((r for r in rows if r is not None), None)
    shape = _agree_on_shape(None if first is None else first.shape, device)
    out = torch.zeros((len(rows), *shape), device=device)
    for j, r in enumerate(rows):
        if r is not None:
            out[j] = r
    return out


def _agree_on_shape(shape: torch.Size | None, device: torch.device) -> tuple[int, ...]:
    if not (dist.is_available() and dist.is_initialized()):
        if shape is None:
            raise ValueError("nothing to encode: no image of the eval split could be decoded")
        return tuple(shape)
    dims = torch.full((4,), -1, dtype=torch.long)
    if shape is not None:
        dims[0] = len(shape)
        dims[1 : 1 + len(shape)] = torch.as_tensor(shape)
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    dims = dims.to(comm)
    dist.all_reduce(dims, op=dist.ReduceOp.MAX)
    if int(dims[0]) < 0:
        raise ValueError("nothing to encode on any rank: no image of the eval split could be decoded")
    return tuple(int(d) for d in dims[1 : 1 + int(dims[0])])


@dataclass
class _GroundTruth:
    img2txt: list[list[int]]
    txt2img: list[int]
    kept_texts: list[int]


def _restrict(split: RetrievalData, valid: torch.Tensor) -> _GroundTruth:
    """Ground truth re-indexed to the decodable images and their captions."""
    valid_l = valid.tolist()
    new_img = {}
    for i, ok in enumerate(valid_l):
        if ok:
            new_img[i] = len(new_img)
    kept = [t for t, i in enumerate(split.txt2img) if valid_l[int(i)]]
    new_txt = {t: j for j, t in enumerate(kept)}
    img2txt = [[new_txt[t] for t in split.img2txt[i]] for i in range(len(valid_l)) if valid_l[i]]
    txt2img = [new_img[int(split.txt2img[t])] for t in kept]
    return _GroundTruth(img2txt, txt2img, kept)


def evaluate_retrieval(
    model: torch.nn.Module,
    split: RetrievalData,
    *,
    k_test: int,
    batch_size: int,
    device: torch.device | str,
    rank: int | None = None,
    world_size: int | None = None,
    itm_batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    label: str = "retrieval eval",
) -> dict[str, float]:
    """LAVIS retrieval metrics (txt/img_r1/5/10, means, r_mean, agg_metrics = txt_r_mean) of `model` on `split`,
    plus `skipped_images`: the undecodable images left out (with their captions).

    Call on every rank of an initialised process group (it is a collective), or in a single process.
    `batch_size` is the encoding batch (run.batch_size_eval), `itm_batch_size` the number of pairs per ITM
    forward (default batch_size). Restores the model's train/eval mode afterwards. `label` names the
    progress output. `evaluate_retrieval_scores` also returns the score matrices.
    """
    scores = compute_score_matrices(
        model,
        split,
        k_test=k_test,
        batch_size=batch_size,
        device=device,
        rank=rank,
        world_size=world_size,
        itm_batch_size=itm_batch_size,
        autocast_dtype=autocast_dtype,
        label=label,
    )
    return scores_to_metrics(scores)


def evaluate_retrieval_scores(model: torch.nn.Module, split: RetrievalData, **options: Any
                              ) -> tuple[dict[str, float], ScoreMatrices]:
    """`evaluate_retrieval`'s metrics (same keyword options) and the score matrices they come from, which the
    retrieval gallery (qformer.evaluate.gallery) draws."""
    scores = compute_score_matrices(model, split, **options)
    return scores_to_metrics(scores), scores


def scores_to_metrics(scores: ScoreMatrices) -> dict[str, float]:
    if scores.skipped_images:
        log.warning("retrieval eval: %d undecodable images left out with their captions", scores.skipped_images)
    metrics = retrieval_metrics(scores.i2t, scores.t2i, scores.img2txt, scores.txt2img)
    return {**metrics, "skipped_images": float(scores.skipped_images)}  # logged beside the recalls

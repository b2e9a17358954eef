"""What an evaluation shows besides numbers: the retrieval gallery and the query attention grid of a split.

`write_visuals` renders, into a folder, for one evaluated split:
- retrieval_gallery.png (+ .json: the picks, hits, scores and correct flags), from the evaluation's own
  score matrices (no extra model work);
- query_attention.png: the cross-attention maps of the first `n_attention` gallery images, one extra
  query pass over just those images.
It runs on one process (rank 0) after the collective evaluation, in fp32, and touches no other rank.

`log_visuals` puts such a folder into an MLflow run under visuals/<split>/<label>/, so the run's
Artifacts tab shows one gallery and one grid per evaluation (the training run: label step_<global
step>; `qformer eval`: no label). A failure to render or log is a warning, never the end of a run.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qformer.data.images import load_rgb
from qformer.data.normalize import normalize_uint8
from qformer.evaluate.attention_grid import render_attention_grid
from qformer.evaluate.gallery import build_gallery, render_gallery
from qformer.evaluate.retrieval import CLIP_MEAN, CLIP_STD
from qformer.models.attention_maps import patch_grid, query_cross_attention

log = logging.getLogger("qformer.evaluate.visuals")

GALLERY_PNG = "retrieval_gallery.png"
GALLERY_JSON = "retrieval_gallery.json"
ATTENTION_PNG = "query_attention.png"
ARTIFACT_ROOT = "visuals"


def write_visuals(model: torch.nn.Module, split: Any, scores: Any, out_dir: str | Path, *, device: torch.device | str,
                  split_name: str = "", n_captions: int = 4, n_images: int = 4, n_attention: int = 3, k: int = 5,
                  seed: int = 0, autocast_dtype: torch.dtype | None = None) -> list[Path]:
    """Render the gallery and the attention grid of `split` (a RetrievalSplit) into `out_dir`; returns the files.
    `autocast_dtype`: the evaluation's (the attention pass runs in the same precision)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    max_pixels = getattr(split, "max_pixels", None)
    gallery = build_gallery(scores, split.texts, split.image_paths, split=split_name, n_captions=n_captions,
                            n_images=n_images, k=k, seed=seed)
    picture, _ = render_gallery(gallery, lambda path: load_rgb(path, max_pixels), k=k)
    picture.save(out / GALLERY_PNG)
    (out / GALLERY_JSON).write_text(json.dumps(gallery.to_dict(), indent=1))
    files = [out / GALLERY_PNG, out / GALLERY_JSON]

    chosen = [row.query_index for row in gallery.image_to_text][:n_attention]
    if chosen:
        files.append(_write_attention(model, split, chosen, out / ATTENTION_PNG, device, split_name, autocast_dtype))
    return files


def _write_attention(model: torch.nn.Module, split: Any, rows: list[int], target: Path,
                     device: torch.device | str, split_name: str, autocast_dtype: torch.dtype | None) -> Path:
    paths = [split.image_paths[i] for i in rows]
    images = np.stack([split.vis_processor(load_rgb(p, getattr(split, "max_pixels", None))) for p in paths])
    pixels = normalize_uint8(torch.as_tensor(images).to(device), getattr(split, "mean", CLIP_MEAN),
                             getattr(split, "std", CLIP_STD))
    attention = query_cross_attention(model, pixels, autocast_dtype)
    maps = patch_grid(attention).cpu().numpy()
    picture, _ = render_attention_grid(list(images), maps, paths, n_tokens=attention.shape[-1],
                                       title=f"{split_name}: where each of the {maps.shape[1]} queries looks")
    picture.save(target)
    return target


def log_visuals(tracker: Any, folder: str | Path, split_name: str, label: str | None = None) -> list[str]:
    """Log every file of `folder` into the run under visuals/<split>[/<label>]; returns the artifact paths."""
    artifact_dir = "/".join(p for p in (ARTIFACT_ROOT, split_name, label) if p)
    logged = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            tracker.log_artifact(path, artifact_dir)
            logged.append(f"{artifact_dir}/{path.name}")
    return logged


def log_eval_visuals(tracker: Any, model: torch.nn.Module, split: Any, scores: Any, split_name: str,
                     label: str | None, device: torch.device | str, autocast_dtype: torch.dtype | None = None
                     ) -> list[str]:
    """write_visuals + log_visuals through a temporary folder; a warning (and []) on any failure."""
    try:
        with tempfile.TemporaryDirectory(prefix="qformer-visuals-") as tmp:
            write_visuals(model, split, scores, tmp, device=device, split_name=split_name,
                          autocast_dtype=autocast_dtype)
            return log_visuals(tracker, tmp, split_name, label)
    except Exception as err:  # pictures are a view on the run, not part of it
        log.warning("retrieval gallery / attention maps for '%s' not logged: %s", split_name, err)
        return []

"""Read caption annotation files as LAVIS ships them, validating every record up front.

Formats (chosen by content, not by name):
- LAVIS JSON list (`coco_karpathy_*.json`, `vg_caption.json`): records with `image` and `caption`
  (a string, or a list of strings in the Karpathy val/test files);
- official COCO captions (`captions_train2017.json`): `{"images": [...], "annotations": [...]}`,
  converted to one record per caption (`image` = the image's `file_name`);
- JSON Lines (`.jsonl`): one LAVIS record per line.
Anything else fails here, before Ray or the model start, naming the file and record index.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qformer.core.errors import AnnotationError


@dataclass(frozen=True)
class CaptionRecord:
    """One annotation record after validation: `captions` has one entry for train-style records."""

    image: str  # as written in the file (relative or absolute)
    captions: tuple[str, ...]
    image_id: str | None
    index: int  # position in the file, for error messages


def _load_json(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                return [json.loads(line) for line in f if line.strip()]
            return json.load(f)
    except FileNotFoundError:
        raise AnnotationError(path, "annotation file not found") from None
    except json.JSONDecodeError as err:
        raise AnnotationError(path, f"malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise AnnotationError(path, f"not UTF-8 text: {err}") from None


def _from_coco_official(path: str, data: dict) -> list[dict]:
    """Official COCO captions -> LAVIS-style records, one per caption, in annotation order."""
    images = data.get("images")
    anns = data.get("annotations")
    if not isinstance(images, list) or not isinstance(anns, list):
        raise AnnotationError(path, "a COCO captions file needs lists 'images' and 'annotations'")
    files: dict[object, str] = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise AnnotationError(path, "'images' entry needs 'id' and a string 'file_name'", i)
        files[im["id"]] = im["file_name"]
    records = []
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or ann.get("image_id") not in files:
            raise AnnotationError(path, "'annotations' entry has no 'image_id' listed in 'images'", i)
        records.append({"image": files[ann["image_id"]], "caption": ann.get("caption"), "image_id": f"coco_{ann['image_id']}"})
    return records


def _raw_records(path: str) -> list:
    data = _load_json(path)
    if isinstance(data, dict):
        if "annotations" in data and "images" in data:
            return _from_coco_official(path, data)
        raise AnnotationError(path, "expected a JSON list of records or a COCO captions file (keys 'images', 'annotations')")
    if not isinstance(data, list):
        raise AnnotationError(path, f"expected a JSON list of records, got {type(data).__name__}")
    return data


def _encodable(path: str, index: int, key: str, text: str) -> str:
    """JSON may carry lone surrogates (`"\\ud800"`) that no UTF-8 consumer (tokenizer, Arrow) accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise AnnotationError(path, f"'{key}' holds text that is not valid Unicode ({err.reason} at character "
                                    f"{err.start}): {text!r:.80}", index) from None
    return text


def _caption_tuple(path: str, index: int, caption: object) -> tuple[str, ...]:
    if isinstance(caption, str):
        return (_encodable(path, index, "caption", caption),)
    if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
        return tuple(_encodable(path, index, "caption", c) for c in caption)
    if isinstance(caption, list) and not caption:
        raise AnnotationError(path, "'caption' is an empty list", index)
    raise AnnotationError(path, f"'caption' must be a string or a list of strings, got {type(caption).__name__}: {caption!r:.80}", index)


def read_caption_file(path: str | os.PathLike) -> list[CaptionRecord]:
    """All records of one annotation file, validated; raises AnnotationError(file, record index)."""
    path = str(path)
    records: list[CaptionRecord] = []
    for i, rec in enumerate(_raw_records(path)):
        if not isinstance(rec, dict):
            raise AnnotationError(path, f"record must be a JSON object, got {type(rec).__name__}", i)
        if "image" not in rec:
            raise AnnotationError(path, "record has no 'image'", i)
        if "caption" not in rec:
            raise AnnotationError(path, "record has no 'caption'", i)
        image = rec["image"]
        if not isinstance(image, str) or not image.strip():
            raise AnnotationError(path, f"'image' must be a non-empty string, got {image!r:.80}", i)
        _encodable(path, i, "image", image)
        image_id = rec.get("image_id")
        records.append(CaptionRecord(image, _caption_tuple(path, i, rec["caption"]), None if image_id is None else str(image_id), i))
    if not records:
        raise AnnotationError(path, "no records")
    return records


# LAVIS's vg_caption.json points at Salesforce's cluster; such paths are re-rooted (see resolve_image_path).
FOREIGN_ABSOLUTE_PREFIXES = ("/export/share/", "/export/home/")


def resolve_image_path(image: str, image_root: Path) -> str:
    """Where an annotation's `image` lives on this machine.

    Rule: relative paths join the image root (LAVIS's `os.path.join(vis_root, image)`).
    Absolute paths under LAVIS's internal `/export/share/` or `/export/home/` (vg_caption.json writes
    `/export/share/datasets/vision/visual-genome/image/<id>.jpg`) keep only their file name, joined to
    the image root: `<images.storage>/<id>.jpg`. Any other absolute path is used as is.
    """
    if not os.path.isabs(image):
        return str(image_root / image)
    if image.startswith(FOREIGN_ABSOLUTE_PREFIXES):
        return str(image_root / os.path.basename(image))
    return image


def coco_eval_image_id(image: str) -> str:
    """COCOCapEvalDataset's id: basename, `.strip(".jpg")` (a character set!), text after the last `_`."""
    return os.path.basename(image).strip(".jpg").split("_")[-1]

"""Dataset builders `coco_caption`, `vg_caption`, `coco_retrieval`, `flickr30k` (LAVIS caption, pair and retrieval builders).

A builder turns `datasets.<name>` of the config into (image path, caption) training samples and,
for COCO, retrieval val/test splits. Paths: relative `build_info.*.storage` values resolve against
`qformer.core.paths.data_root(run.data_root)` (LAVIS's cache_root).

Any builder reads image-text shards instead of an annotation file when `build_info.storage` names
them (LAVIS's laion builder key): a brace pattern, a glob or a list, local or in object storage, in
one of qformer.data.shard_source.FORMATS. Shards are the train split. Processors come from
`datasets.<name>.{vis,text}_processor.{train,eval}`, else from the model's `preprocess` section
(LAVIS would leave them None; we fall back so that an eval split always has an eval processor).
"""
from __future__ import annotations

from pathlib import Path

from qformer.core.errors import ConfigError
from qformer.data.annotations import CaptionRecord, coco_eval_image_id, read_caption_file, resolve_image_path
from qformer.data.processors import build_processor
from qformer.data.retrieval import RetrievalSplit
from qformer.data.shard_set import ShardSet, expand_shard_set
from qformer.data.storage import is_uri
from qformer.core.paths import data_root
from qformer.core.registry import get_builder_class, register_builder

SPLITS = ("train", "val", "test")


def processor_cfg(cfg, name: str, kind: str, split: str):
    """`datasets.<name>.<kind>.<split>`, else `preprocess.<kind>.<split>`, else None."""
    node = (cfg.datasets[name].get(kind) or {}).get(split)
    if node is None and cfg.get("preprocess") is not None:
        node = (cfg.preprocess.get(kind) or {}).get(split)
    return node


class CaptionBuilder:
    """Shared by both builders; subclasses only say whether val/test exist."""

    has_eval_splits = True
    trains = True  # False: an evaluation-only data set (its train split, if configured, is not read)

    def __init__(self, name: str, cfg) -> None:
        self.name, self.cfg = name, cfg
        self.ds_cfg = cfg.datasets[name]
        self.root = data_root(cfg.run.get("data_root"))
        self._records: dict[str, list[CaptionRecord]] = {}
        self._shards: ShardSet | None = None

    # ---- paths -----------------------------------------------------------------------------
    def _resolve(self, value: str) -> Path:
        path = Path(str(value)).expanduser()
        return path if path.is_absolute() else self.root / path

    def splits(self) -> list[str]:
        if self.is_sharded():
            return ["train"]
        anns = self.ds_cfg.build_info.annotations or {}
        return [s for s in SPLITS if anns.get(s) is not None and (self.has_eval_splits if s != "train" else self.trains)]

    # ---- shards ------------------------------------------------------------------------------
    def is_sharded(self) -> bool:
        return self.ds_cfg.build_info.get("storage") is not None

    def shard_set(self) -> ShardSet:
        """The configured shards, expanded (globs listed; named shards not checked: see preflight)."""
        if self._shards is None:
            self._shards = self._read_shard_set()
        return self._shards

    def _read_shard_set(self) -> ShardSet:
        info, key = self.ds_cfg.build_info, f"datasets.{self.name}.build_info"
        spec = info.storage
        specs = [spec] if isinstance(spec, str) else [str(x) for x in spec]
        specs = [x if is_uri(x) else str(self._resolve(x)) for x in specs]
        root = info.get("image_root")
        if root is not None and not is_uri(str(root)):
            root = str(self._resolve(root))
        return expand_shard_set(self.name, specs, key, fmt=info.get("format"), text_key=info.get("text_key"),
                                image_key=info.get("image_key"), image_root=root,
                                endpoint=self.cfg.run.data.get("s3_endpoint"),
                                parts_per_epoch=int(info.get("parts_per_epoch") or 1), num_samples=info.get("num_samples"))

    def annotation_path(self, split: str) -> Path:
        try:
            storage = self.ds_cfg.build_info.annotations[split].storage
        except (KeyError, AttributeError):
            storage = None
        if not storage:
            raise ConfigError("no annotation storage path for this split",
                              f"datasets.{self.name}.build_info.annotations.{split}.storage")
        return self._resolve(storage)

    def image_root(self) -> Path:
        storage = (self.ds_cfg.build_info.get("images") or {}).get("storage")
        if not storage:
            raise ConfigError("no image directory for the annotation file's images",
                              f"datasets.{self.name}.build_info.images.storage")
        return self._resolve(storage)

    def image_path(self, record: CaptionRecord) -> str:
        return resolve_image_path(record.image, self.image_root())

    # ---- records and processors ------------------------------------------------------------
    def records(self, split: str) -> list[CaptionRecord]:
        if split not in self._records:
            # a missing image folder is qformer.data.preflight's to report (once, before Ray starts)
            self._records[split] = read_caption_file(self.annotation_path(split))
        return self._records[split]

    def processor(self, kind: str, split_kind: str):
        node = processor_cfg(self.cfg, self.name, kind, split_kind)
        if node is None:
            raise ConfigError(f"no {kind} for '{split_kind}' (set it here or in preprocess.{kind}.{split_kind})",
                              f"datasets.{self.name}.{kind}.{split_kind}")
        proc = build_processor(node)
        if kind == "vis_processor":  # decode only the pixels the output needs (run.data.train_decode / eval_decode)
            proc.reduced_decode = self.cfg.run.data.get(f"{split_kind}_decode") == "reduced"
        size = getattr(proc, "image_size", None)
        model_size = int(self.cfg.model.image_size)
        if size is not None and size != model_size:
            raise ConfigError(f"image_size {size} differs from model.image_size {model_size}",
                              f"datasets.{self.name}.{kind}.{split_kind}.image_size")
        return proc

    # ---- outputs -----------------------------------------------------------------------------
    def train_samples(self, split: str = "train") -> list[tuple[str, str]]:
        """(image path, raw caption) per caption (a list-valued record gives one per caption)."""
        if self.is_sharded():  # only the training stream reads shards; tools that list samples can't
            raise ConfigError("names image-text shards, which only `qformer train` reads (not `cache-features` "
                              "or the benchmarks' sample lists)", f"datasets.{self.name}.build_info.storage")
        return [(self.image_path(r), c) for r in self.records(split) for c in r.captions]

    def retrieval_split(self, split: str) -> RetrievalSplit:
        if not self.has_eval_splits:
            raise ConfigError(f"builder '{self.name}' has no evaluation splits", f"datasets.{self.name}")
        text_proc = self.processor("text_processor", "eval")
        vis_proc = self.processor("vis_processor", "eval")
        # Group by image (first-appearance order): Karpathy val/test already have one record per image;
        # per-caption files (official COCO captions_val2017.json, Karpathy-train style) are merged.
        by_image: dict[str, tuple[CaptionRecord, list[str]]] = {}
        for rec in self.records(split):
            by_image.setdefault(self.image_path(rec), (rec, []))[1].extend(rec.captions)
        paths, texts, img2txt, txt2img, ids = [], [], [], [], []
        for img_index, (path, (rec, captions)) in enumerate(by_image.items()):
            paths.append(path)
            ids.append(coco_eval_image_id(rec.image))
            img2txt.append(list(range(len(texts), len(texts) + len(captions))))
            texts.extend(text_proc(c) for c in captions)
            txt2img.extend([img_index] * len(captions))
        return RetrievalSplit(self.name, split, paths, texts, img2txt, txt2img, ids, vis_proc.image_size,
                              vis_processor=vis_proc, mean=vis_proc.mean, std=vis_proc.std)


@register_builder("coco_caption")
class CocoCaptionBuilder(CaptionBuilder):
    """COCO Karpathy splits: train one record per caption; val/test one per image with a caption list."""


@register_builder("coco_retrieval")
class CocoRetrievalBuilder(CaptionBuilder):
    """LAVIS's retrieval-config name for the COCO Karpathy splits: coco_caption's files, layout and images."""


@register_builder("flickr30k")
class Flickr30kBuilder(CaptionBuilder):
    """Flickr30K Karpathy val/test (LAVIS's flickr30k annotation files: one record per image, 5 captions), for
    zero-shot retrieval as the BLIP-2 paper reports it: the train split takes no part in training."""

    trains = False


@register_builder("vg_caption")
class VGCaptionBuilder(CaptionBuilder):
    """Visual Genome region captions: train only; absolute `/export/share/...` paths are re-rooted."""

    has_eval_splits = False


class PairBuilder(CaptionBuilder):
    """Image-text pairs for pretraining only (LAVIS's image_text_pair_builder family)."""

    has_eval_splits = False


for _name in ("image_text_shards", "conceptual_caption_3m", "conceptual_caption_12m", "sbu_caption", "laion400m"):
    register_builder(_name)(type(f"PairBuilder_{_name}", (PairBuilder,), {"__doc__": PairBuilder.__doc__}))


def build_builder(cfg, name: str) -> CaptionBuilder:
    """`datasets.<name>`'s builder: `datasets.<name>.builder` when set, else the registered `<name>`."""
    return get_builder_class(str(cfg.datasets[name].get("builder") or name))(name, cfg)

"""What `qformer data download NAME` fetches, and where each file lands under the data root.

Annotation files: LAVIS's, from the URLs and to the `storage` paths of the packaged dataset defaults
(qformer/config/defaults/datasets/*/default.yaml, copied from LAVIS's configs/datasets/*/defaults*.yaml),
so they land exactly where the builders read them. Images: the archives LAVIS's download scripts fetch
(lavis/datasets/download_scripts/download_coco.py, download_vg.py), unpacked into the builders' image
folders. Published MD5s are LAVIS's (its configs and script comments); files on Google Cloud Storage are
also checked against the MD5 the server sends.

- coco: Karpathy train/val/test + train2014.zip and val2014.zip -> coco/images/{train2014,val2014}/.
  (LAVIS's script also fetches test2014/test2015, which no Karpathy split uses: not fetched.)
- vg: vg_caption.json + images.zip (VG_100K/) and images2.zip (VG_100K_2/), both flattened into
  vg/images/, the one folder vg_caption.json's absolute paths are re-rooted to.
- flickr30k: LAVIS's Karpathy train/val/test annotation files only. The images are not public: the
  publisher hands them out after a form (LAVIS's download_flickr.py uses a Kaggle copy, which needs an
  account); put them in flickr30k/images/flickr30k-images/.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf

from qformer.config.packaged import DEFAULTS_DIR
from qformer.core.errors import ConfigError, closest

ARCHIVE_DIR = "downloads"  # archives are kept under <root>/downloads/<dataset>/ until unpacked


@dataclass(frozen=True)
class Asset:
    url: str
    path: str  # relative to the data root: where the file lands (an archive: where it is kept)
    md5: str | None = None
    extract_to: str | None = None  # an archive: the folder (relative to the root) it unpacks into
    strip: int = 0  # leading member folders dropped when unpacking


@dataclass(frozen=True)
class DatasetDownload:
    name: str
    assets: tuple[Asset, ...]
    approx_bytes: int  # what the fetched files take (archives + annotations), for the plan line
    note: str = ""
    builders: tuple[str, ...] = field(default=())


def _annotations(builder: str) -> list[Asset]:
    cfg = OmegaConf.load(DEFAULTS_DIR / "datasets" / builder / "default.yaml")
    anns = cfg.datasets[builder].build_info.annotations
    return [Asset(str(a.url), str(a.storage), a.get("md5")) for _, a in sorted(anns.items())]


def _archive(dataset: str, url: str, md5: str | None, extract_to: str, strip: int = 0) -> Asset:
    return Asset(url, f"{ARCHIVE_DIR}/{dataset}/{url.rsplit('/', 1)[1]}", md5, extract_to, strip)


def _coco() -> DatasetDownload:
    images = [
        _archive("coco", "http://images.cocodataset.org/zips/train2014.zip", "0da8c0bd3d6becc4dcb32757491aca88",
                 "coco/images"),
        _archive("coco", "http://images.cocodataset.org/zips/val2014.zip", "a3d79f5ed8d289b7a7554ce06a5782b3",
                 "coco/images"),
    ]
    return DatasetDownload("coco", tuple(_annotations("coco_caption") + images), 20_300_000_000,
                           builders=("coco_caption", "coco_retrieval"))


def _vg() -> DatasetDownload:
    images = [
        _archive("vg", "https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", None, "vg/images", strip=1),
        _archive("vg", "https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", None, "vg/images", strip=1),
    ]
    return DatasetDownload("vg", tuple(_annotations("vg_caption") + images), 15_400_000_000, builders=("vg_caption",))


def _flickr30k() -> DatasetDownload:
    note = ("Flickr30K images are not fetched: the publisher hands them out after a request form "
            "(https://shannon.cs.illinois.edu/DenotationGraph/; LAVIS's download_flickr.py uses a Kaggle copy, "
            "which needs an account). Put them in <root>/flickr30k/images/flickr30k-images/<id>.jpg.")
    return DatasetDownload("flickr30k", tuple(_annotations("flickr30k")), 5_000_000, note, builders=("flickr30k",))


CATALOG = {"coco": _coco, "vg": _vg, "flickr30k": _flickr30k}


def dataset_download(name: str) -> DatasetDownload:
    if name not in CATALOG:
        raise ConfigError(f"unknown data set {name!r}; known: {', '.join(CATALOG)}", suggestion=closest(name, CATALOG))
    return CATALOG[name]()

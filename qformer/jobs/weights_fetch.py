"""`qformer weights fetch NAME...`: the pretrained weights the configs name, fetched once and verified, so an
offline cluster trains after one fetch.

Where they go:
- default: the caches the loaders already read, so the packaged configs work unchanged and offline: the
  `.pth` files into torch.hub's cache (`$TORCH_HOME/hub/checkpoints/<file>`, where `model.vit_weights` /
  `model.pretrained` URLs are looked up first), BERT into the Hugging Face cache (`$HF_HOME/hub`, where
  `model.bert_model: bert-base-uncased` is looked up; then set HF_HUB_OFFLINE=1 on the nodes). Point
  TORCH_HOME and HF_HOME at shared storage and every node sees them.
- `--to DIR`: one folder (shared storage): `DIR/<file>.pth` and `DIR/bert-base-uncased/`; the command
  prints the `--options` that point the config keys at them.
- `--to s3://bucket/prefix`: the same layout, staged locally then uploaded.

The `.pth` files come from the URLs LAVIS uses (eva_vit.py, clip_vit.py, the blip2 model configs), through
qformer.core.http_fetch (resumed, size and the MD5 Google Cloud Storage sends checked), and are then
opened as the zip archives torch saves, every member's CRC checked. BERT comes through huggingface_hub's
`snapshot_download` (HF_ENDPOINT for a mirror, HF_HUB_OFFLINE honoured, its own checksums).
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qformer.core.errors import ConfigError, closest
from qformer.core.http_fetch import FetchError, RemoteFile, fetch_all, mirrored
from qformer.core.paths import qformer_home
from qformer.data.storage import is_uri, upload_tree

LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2"
BERT_FILES = ["config.json", "vocab.txt", "tokenizer_config.json", "tokenizer.json", "model.safetensors"]


@dataclass(frozen=True)
class Weight:
    name: str
    key: str  # the config key that reads it
    about: str
    url: str | None = None  # a .pth file
    hub_repo: str | None = None  # a Hugging Face repository

    @property
    def file(self) -> str:
        return self.url.rsplit("/", 1)[1] if self.url else self.hub_repo.replace("/", "--")


WEIGHTS = {w.name: w for w in (
    Weight("eva_vit_g", "model.vit_weights", "EVA ViT-g/14 (model_type pretrain, coco; ~2 GB)",
           url=f"{LAVIS}/eva_vit_g.pth"),
    Weight("clip_vit_L", "model.vit_weights", "CLIP ViT-L/14 (model_type pretrain_vitL; ~0.6 GB)",
           url=f"{LAVIS}/clip_vit_L.pth"),
    Weight("blip2_pretrained", "model.pretrained", "LAVIS's stage-1 BLIP-2 with ViT-g",
           url=f"{LAVIS}/blip2_pretrained.pth"),
    Weight("blip2_pretrained_vitL", "model.pretrained", "LAVIS's stage-1 BLIP-2 with ViT-L",
           url=f"{LAVIS}/blip2_pretrained_vitL.pth"),
    Weight("blip2_finetune_coco", "model.finetuned", "LAVIS's COCO retrieval fine-tune (model_type coco)",
           url=f"{LAVIS}/blip2_finetune_coco.pth"),
    Weight("bert-base-uncased", "model.bert_model", "the Q-Former's initial BERT (~0.44 GB)",
           hub_repo="bert-base-uncased"),
)}


def lookup(names: list[str]) -> list[Weight]:
    out = []
    for name in names:
        if name not in WEIGHTS:
            raise ConfigError(f"unknown weights {name!r}; known: {', '.join(WEIGHTS)}", suggestion=closest(name, WEIGHTS))
        out.append(WEIGHTS[name])
    return out


def torch_checkpoints_dir() -> Path:
    """torch.hub's cache of URL downloads, as `load_state_dict_from_url` computes it (honours TORCH_HOME)."""
    import torch.hub  # lazy: torch only when a .pth is fetched

    return Path(torch.hub.get_dir()) / "checkpoints"


def verify_torch_file(path: Path) -> None:
    """A file torch.save wrote (zip format) whose every member reads back with its CRC; FetchError if not."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except zipfile.BadZipFile as err:
        raise FetchError(f"{path}: not a torch checkpoint (zip) file ({err})") from None
    if bad is not None:
        raise FetchError(f"{path}: member {bad} fails its CRC check (damaged download; delete it and re-run)")


def _bert(weight: Weight, folder: Path | None) -> Path:
    """The BERT snapshot: into `folder/<repo>` when given, else the Hugging Face cache."""
    from huggingface_hub import snapshot_download  # lazy: only for BERT

    try:
        path = snapshot_download(weight.hub_repo, allow_patterns=BERT_FILES,
                                 local_dir=str(folder / weight.file) if folder else None)
    except Exception as err:  # offline without a cache, a mirror that is down, an unknown repository
        raise FetchError(f"{weight.name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                         f"(HF_ENDPOINT={os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}, "
                         f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})") from None
    path = Path(path)
    missing = [f for f in ("config.json", "vocab.txt") if not (path / f).is_file()]
    if missing or not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise FetchError(f"{weight.name}: the snapshot in {path} lacks {missing or 'weights'}")
    return path


def fetch_weights(names: list[str], to: str | None = None, mirrors: dict[str, str] | None = None, workers: int = 4,
                  endpoint: str | None = None, **fetch_kwargs) -> tuple[dict[str, str], list[str]]:
    """Fetch `names`; returns ({config key=value lines by name}, [errors])."""
    weights = lookup(names)
    remote = bool(to) and is_uri(str(to))
    folder = (qformer_home() / "cache" / "weights-staging" if remote else Path(to).expanduser().resolve()) if to else None
    files = [w for w in weights if w.url]
    pth_dir = folder or (torch_checkpoints_dir() if files else None)
    items = [RemoteFile(mirrored(w.url, mirrors), pth_dir / w.file) for w in files]
    done, failed = fetch_all(items, workers=workers, desc="weights fetch", **fetch_kwargs) if items else ([], [])
    errors = [err for _, err in failed]
    where: dict[str, str] = {}
    manifest: dict[str, dict] = {}
    for got in done:
        weight = next(w for w in files if pth_dir / w.file == got.file.dest)
        try:
            verify_torch_file(got.file.dest)
        except FetchError as err:
            errors.append(str(err))
            continue
        manifest[weight.name] = {"file": weight.file, "bytes": got.bytes, "url": weight.url,
                                 "md5_checked": got.md5_checked}
        where[weight.name] = str(got.file.dest) if to else weight.url
    for weight in (w for w in weights if w.hub_repo):
        try:
            path = _bert(weight, folder)
        except FetchError as err:
            errors.append(str(err))
            continue
        manifest[weight.name] = {"folder": weight.file if folder else str(path), "repo": weight.hub_repo}
        where[weight.name] = str(path) if to else weight.hub_repo
    if folder is not None and manifest:
        old = json.loads((folder / "weights.json").read_text()) if (folder / "weights.json").is_file() else {}
        (folder / "weights.json").write_text(json.dumps({**old, **manifest}, indent=2))
    if remote and where:
        upload_tree(folder, str(to), endpoint)
        for name, path in where.items():
            where[name] = str(to).rstrip("/") + "/" + str(Path(path).relative_to(folder))
    return {name: f"{WEIGHTS[name].key}={value}" for name, value in where.items()}, errors

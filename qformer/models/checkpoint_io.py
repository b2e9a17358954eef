"""Loading LAVIS-layout checkpoints ({"model": state_dict, ...}) into a model, non-strictly."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from qformer.core.uri_files import is_object_uri, local_copy

log = logging.getLogger(__name__)


CKPT_FILE = "checkpoint.pth"  # ours, inside a checkpoint directory (LAVIS's layout in the file)


def resolve_file(path: str | Path) -> Path:
    """A checkpoint file, or a directory holding checkpoint.pth (ours) or exactly one *.pth (LAVIS's)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / CKPT_FILE).is_file():
            return path / CKPT_FILE
        candidates = sorted(path.glob("*.pth"))
        if len(candidates) == 1:
            return candidates[0]
        raise FileNotFoundError(f"checkpoint directory {path} has no {CKPT_FILE} and {len(candidates)} *.pth files")
    raise FileNotFoundError(f"checkpoint {path} does not exist")


def torch_load(file: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """The one way this package reads a torch file: torch.load(weights_only=True), so a pickle with
    arbitrary objects is refused rather than executed (checkpoints, LAVIS's files and ViT/BERT weights
    are tensors and plain values). mmap=True maps the tensors instead of reading them (zip format only:
    a legacy file is read whole)."""
    if mmap:
        try:
            return torch.load(file, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
    return torch.load(file, map_location=map_location, weights_only=True)


def read_checkpoint(source: str | Path, mmap: bool = False) -> Any:
    """A checkpoint from a file, a checkpoint directory, or an http(s) URL (fetched once into torch.hub's
    cache). ValueError names the source when it is missing or cannot be read."""
    source = str(source)
    if is_object_uri(source):  # s3:// or gs://: a local copy, made once (`qformer weights fetch --to s3://...`)
        try:
            source = str(local_copy(source))
        except FileNotFoundError as err:
            raise ValueError(f"checkpoint not found: {err}") from None
    if source.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(source, map_location="cpu", check_hash=False, weights_only=True)
    try:
        file = resolve_file(source)
    except FileNotFoundError as err:
        raise ValueError(f"checkpoint not found: {err}") from None
    try:
        return torch_load(file, mmap=mmap)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {file} with torch.load(weights_only=True): {err}") from err


def extract_state_dict(checkpoint: Mapping[str, Any], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where}: expected a state dict or {{'model': state_dict}}")
    return dict(state)


def load_model_checkpoint(model: nn.Module, path_or_state: str | Path | Mapping[str, Any]) -> dict[str, list[str]]:
    """strict=False load; returns {"missing": [...], "unexpected": [...]} and logs both.

    Shape mismatches raise (a silently skipped tensor would hide a wrong model_type)."""
    where = str(path_or_state) if isinstance(path_or_state, (str, Path)) else "state dict"
    checkpoint = read_checkpoint(path_or_state) if isinstance(path_or_state, (str, Path)) else path_or_state
    state = extract_state_dict(checkpoint, where)
    ours = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in state.items() if k in ours and ours[k].shape != v.shape]
    if bad:
        raise ValueError(f"{where}: shape mismatch for {len(bad)} tensors, e.g. {bad[:3]}")
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    log.info("loaded %s: %d missing keys, %d unexpected keys", where, len(missing), len(unexpected))
    if unexpected:
        log.warning("unexpected keys in %s: %s", where, unexpected[:10])
    return {"missing": missing, "unexpected": unexpected}

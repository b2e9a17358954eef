"""Loading LAVIS-layout checkpoints ({"model": state_dict, ...}) into a model, non-strictly."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)


def read_checkpoint(source: str | Path) -> dict[str, Any]:
    source = str(source)
    if source.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(source, map_location="cpu", check_hash=False, weights_only=False)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {source}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {source}: {err}") from err


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

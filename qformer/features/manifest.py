"""The manifest: which settings produced a feature cache, and the check that a config may use it.

Cached features are only interchangeable with the online ViT when every setting that shapes
them matches (encoder, its weights and precision, image size, the image transforms) and the
stored token ids match the text settings. `check_compatible` names each mismatching key.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from qformer.core.errors import ConfigError
from qformer.data.builders import processor_cfg
from qformer.features.store import FORMAT_VERSION, MANIFEST

# cfg.model keys that determine the ViT output.
VISION_KEYS = ("vit_model", "vit_kwargs", "vit_weights", "vit_precision", "image_size")
# cfg.model keys that determine the stored token ids.
TEXT_KEYS = ("bert_model", "max_txt_len")


def _plain(value: Any) -> Any:
    """OmegaConf nodes -> JSON-comparable plain values (tuples become lists)."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _get(node: Any, key: str, default: Any = None) -> Any:
    try:
        return node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    except Exception:  # omegaconf struct mode raises on unknown keys
        return default


def cache_settings(cfg: Any, sources: list[str] | None = None) -> dict[str, Any]:
    """Dotted config key -> value for every setting the cached features/tokens depend on.

    Processor settings are the effective ones (a dataset's own, else the model's `preprocess`),
    keyed by the dataset, because that is what the writer ran.
    """
    out: dict[str, Any] = {}
    for key in VISION_KEYS + TEXT_KEYS:
        out[f"model.{key}"] = _plain(_get(cfg.model, key))
    names = sources if sources is not None else [str(n) for n in cfg.datasets]
    for name in names:
        if name not in cfg.datasets:
            continue  # reported as a missing key by mismatches()
        for kind, split in (("vis_processor", "train"), ("vis_processor", "eval"), ("text_processor", "train")):
            out[f"datasets.{name}.{kind}.{split}"] = _plain(processor_cfg(cfg, name, kind, split))
    return out


def build_manifest(cfg: Any, views: int, seed: int, sources: dict[str, int], n_images: int,
                   feature_shape: tuple[int, int], skipped: list[str]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "settings": cache_settings(cfg, sorted(sources)),
        "views": int(views),
        "view_0": "eval transform",
        "seed": int(seed),
        "sources": {k: int(v) for k, v in sorted(sources.items())},
        "n_images": int(n_images),
        "feature_shape": [int(x) for x in feature_shape],
        "dtype": "float16",
        "skipped_images": list(skipped),
    }


def write_manifest(cache_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(cache_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return path


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{cache_dir} is not a feature cache (no {MANIFEST}); create one with "
                          f"`qformer cache-features --cfg-path F --out {cache_dir}`", key="run.vision_cache")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})", key="run.vision_cache") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path} has format_version {manifest.get('format_version')!r}, this code reads "
                          f"{FORMAT_VERSION}; rebuild the cache", key="run.vision_cache")
    return manifest


def mismatches(manifest: dict[str, Any], cfg: Any) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (value in the cache, value in cfg) for each differing setting."""
    stored: dict[str, Any] = manifest["settings"]
    sources = [k for k in stored_sources(manifest)]
    current = cache_settings(cfg, sources)
    keys = sorted(set(stored) | set(current))
    return {k: (stored.get(k), current.get(k)) for k in keys if stored.get(k) != current.get(k)}


def stored_sources(manifest: dict[str, Any]) -> list[str]:
    return sorted(manifest.get("sources", {}))


def check_compatible(manifest: dict[str, Any], cfg: Any, cache_dir: str | Path) -> None:
    """Raise ConfigError (naming run.vision_cache and every differing key) unless cfg may use the cache."""
    diff = mismatches(manifest, cfg)
    if diff:
        lines = "; ".join(f"{k}: cache has {a!r}, config has {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"the feature cache at {cache_dir} was made with different settings ({lines}); "
                          "rebuild it with `qformer cache-features` or unset run.vision_cache", key="run.vision_cache")

"""Load an experiment config: merge the layers, resolve, validate, fill defaults.

Layers, lowest to highest priority (LAVIS's order):
  model defaults  defaults/models/<model.arch>/<model.model_type>.yaml (whole file, incl. preprocess:)
  dataset defaults  defaults/datasets/<name>/<datasets.<name>.type>.yaml, for each dataset
  the experiment file
  --options
Unlike LAVIS, model.arch / model.model_type / datasets.<name>.type given in --options also pick
which default files load (LAVIS only overwrote the value after loading the old defaults).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qformer.config import packaged
from qformer.core.errors import ConfigError, closest
from qformer.config.options import SOURCE as OPTIONS_SOURCE
from qformer.config.options import parse_options
from qformer.config.schema import IGNORED
from qformer.config.validate import is_named_entry, is_section, validate

logger = logging.getLogger("qformer.config")

DEFAULT_SOURCE = "default"
SECTIONS = ("model", "datasets", "run", "preprocess")
Layer = tuple[str, dict]  # (label, plain nested dict)


def load_config(cfg_path: str | Path | None, options: list[str] | None = None, with_sources: bool = False):
    """The validated config of an experiment YAML (+ --options) as an OmegaConf DictConfig.

    with_sources=True returns (cfg, sources): sources maps each dotted leaf key to the layer
    it came from ("default", "model defaults: <file>", "dataset defaults: <file>",
    "experiment: <file>", "--options").
    """
    if cfg_path is None:
        return _resolve(("experiment: (none)", {}), options, with_sources)
    path = Path(cfg_path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {cfg_path}")
    label = f"experiment: {cfg_path}"
    return _resolve((label, _read_yaml(path, label)), options, with_sources)


def load_config_dict(d: dict | DictConfig, options: list[str] | None = None, with_sources: bool = False):
    """Same as load_config for an experiment given as a dict (tests, sweeps)."""
    data = _plain(d)
    label = "experiment: <dict>"
    if not isinstance(data, dict):
        raise ConfigError(f"an experiment must be a mapping with model/datasets/run, got {type(data).__name__}",
                          source=label)
    return _resolve((label, data), options, with_sources)


def _plain(value: Any) -> Any:
    """Plain containers from a dict that may hold DictConfig nodes, tuples or numpy scalars (sweeps)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=False)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return copy.deepcopy(value)


def _read_yaml(path: Path, label: str) -> dict:
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - yaml.YAMLError and friends: name the file, not a traceback
        raise ConfigError(f"cannot read YAML: {_first_line(err)}", source=label) from None
    if isinstance(loaded, ListConfig):
        raise ConfigError("the file must be a mapping with model/datasets/run sections, not a list", source=label)
    return OmegaConf.to_container(loaded, resolve=False)


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


def _resolve(experiment: Layer, options: list[str] | None, with_sources: bool):
    user_layers: list[Layer] = [experiment, (OPTIONS_SOURCE, parse_options(options))]
    for label, data in user_layers:
        _check_sections(data, label)
    layers = [*_default_layers(user_layers), *user_layers]

    merged: dict = {}
    sources: dict[str, str] = {}
    for label, data in layers:
        _merge(merged, data, label, sources, "")

    def source_of(path: str) -> str | None:
        return _source_of(sources, path)

    plain = _interpolate(merged, source_of)
    filled, ignored = validate(plain, source_of)
    for key, value in ignored:
        _warn_ignored(key, value, source_of(key))
    sources = {leaf: sources.get(leaf, DEFAULT_SOURCE) for leaf in _leaves(filled, "")}
    cfg = OmegaConf.create(filled)
    return (cfg, sources) if with_sources else cfg


# (key, value, source) already reported: a sweep loads its base config once per probe and trial,
# and the user needs each warning once per process, not once per load.
_WARNED: set[tuple[str, str, str | None]] = set()


def _warn_ignored(key: str, value: Any, source: str | None) -> None:
    if (key, repr(value), source) in _WARNED:
        return
    _WARNED.add((key, repr(value), source))
    logger.warning("%s = %r (%s) is a LAVIS key qformer ignores: %s", key, value, source, IGNORED[key])


def _check_sections(data: dict, label: str) -> None:
    for key, value in data.items():
        if key not in SECTIONS:
            hint = closest(str(key), SECTIONS)
            raise ConfigError(f"unknown top-level section (expected {', '.join(SECTIONS)})", str(key), label, hint)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"expected a section (a mapping of keys), got {value!r}", str(key), label)


def _pick(layers: list[Layer], path: tuple[str, ...], default: Any = None) -> tuple[Any, str | None]:
    """The value at `path` from the highest layer that sets it, and that layer's label."""
    for label, data in reversed(layers):
        node: Any = data
        for part in path:
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            return node, label
    return default, None


_MISSING = object()


def _default_layers(user_layers: list[Layer]) -> list[Layer]:
    """The model and dataset default files that the user layers select."""
    arch, arch_src = _pick(user_layers, ("model", "arch"))
    model_type, type_src = _pick(user_layers, ("model", "model_type"))
    for key, value, src in (("model.arch", arch, arch_src), ("model.model_type", model_type, type_src)):
        if value is None:
            raise ConfigError(f"missing required value (set it in the experiment file or with --options {key}=...)",
                              key, src)
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", key, src)
    layers: list[Layer] = []
    path = packaged.model_defaults(arch, model_type, arch_src, type_src)
    if path is not None:
        label = f"model defaults: {packaged.display(path)}"
        layers.append((label, _read_yaml(path, label)))

    names: list[str] = []
    for _, data in user_layers:
        names += [n for n in (data.get("datasets") or {}) if n not in names]
    for name in names:
        entry, entry_src = _pick(user_layers, ("datasets", name))
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError(f"expected a section (a mapping of keys), got {entry!r}", f"datasets.{name}", entry_src)
        type_, t_src = _pick(user_layers, ("datasets", name, "type"), "default")
        if not isinstance(type_, str):
            raise ConfigError(f"expected a string, got {type_!r}", f"datasets.{name}.type", t_src)
        builder, b_src = _pick(user_layers, ("datasets", name, "builder"))
        builder = name if builder is None else builder  # null (as a saved config writes it): the entry's name
        if not isinstance(builder, str):
            raise ConfigError(f"expected a string, got {builder!r}", f"datasets.{name}.builder", b_src)
        path = packaged.dataset_defaults(builder, type_, b_src if builder != name else entry_src, t_src)
        if path is None:
            continue
        label = f"dataset defaults: {packaged.display(path)}"
        data = _read_yaml(path, label)
        if set(data) != {"datasets"} or set(data["datasets"] or {}) != {builder}:
            raise ConfigError(f"a dataset default file must hold only datasets.{builder}", source=label)
        if builder != name:  # an entry named by the user, built by a registered builder: its defaults apply
            data = {"datasets": {name: data["datasets"][builder]}}
        layers.append((label, data))
    return layers


def _merge(dst: dict, src: dict, label: str, sources: dict[str, str], prefix: str) -> None:
    """OmegaConf-style deep merge (mappings merge, everything else replaces), recording each leaf's layer."""
    for raw_key, value in src.items():
        key = raw_key if isinstance(raw_key, str) else str(raw_key)
        path = prefix + key
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, label, sources, path + ".")
            continue
        if value is None and isinstance(dst.get(key), dict) and is_section(path):
            if path.count(".") >= 2 and is_named_entry(path):  # e.g. annotations.val: null drops the split
                _forget(sources, path)
                del dst[key]
            continue  # `coco_caption:` with nothing below means "the defaults", not "erase them"
        _forget(sources, path)
        if isinstance(value, dict) and value:
            dst[key] = {}
            _merge(dst[key], value, label, sources, path + ".")
        else:
            dst[key] = copy.deepcopy(value)
            sources[path] = label


def _forget(sources: dict[str, str], path: str) -> None:
    for key in [k for k in sources if k == path or k.startswith(path + ".")]:
        del sources[key]


def _source_of(sources: dict[str, str], path: str) -> str | None:
    """The layer of a key: its own, a child's (for a section), or its parent's (for a default-filled child)."""
    if path in sources:
        return sources[path]
    below = [v for k, v in sources.items() if k.startswith(path + ".")]
    if below:
        return below[-1]
    while "." in path:
        path = path.rsplit(".", 1)[0]
        if path in sources:
            return sources[path]
    return None


def _interpolate(merged: dict, source_of) -> dict:
    try:
        return OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or None
        raise ConfigError(f"cannot resolve: {_first_line(err)}", key, source_of(key) if key else None) from None


def _leaves(tree: dict, prefix: str) -> list[str]:
    out: list[str] = []
    for key, value in tree.items():
        path = prefix + str(key)
        if isinstance(value, dict) and value:
            out += _leaves(value, path + ".")
        else:
            out.append(path)
    return out

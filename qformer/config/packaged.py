"""Finding the default YAMLs packaged under qformer/config/defaults/, and which names are known.

A name with a packaged YAML is known without importing anything heavy, so `qformer config`
never imports torch; only names without one fall back to the registry (which imports the
model/data packages to run their @register_* decorators).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from qformer.core import registry
from qformer.core.errors import ConfigError, closest

DEFAULTS_DIR = Path(__file__).resolve().parent / "defaults"
_PACKAGE_PARENT = DEFAULTS_DIR.parents[2]  # the directory holding the `qformer` package

# Processors the data package registers; checked without importing it. Others: the registry.
BUILTIN_PROCESSORS = ("blip_caption", "blip_image_train", "blip_image_eval", "blip2_image_train")


def display(path: Path) -> str:
    """A packaged file as `qformer/config/defaults/...`; other files as given."""
    try:
        return str(path.resolve().relative_to(_PACKAGE_PARENT))
    except ValueError:
        return str(path)


def _yaml_stems(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []


def _subdirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []


def _registered(kind: str) -> list[str]:
    """Registry names of `kind`; empty when the package that registers them cannot be imported yet."""
    try:
        return registry.list_names(kind)
    except ModuleNotFoundError as err:  # the registering package is not written yet; a broken one still raises
        if err.name in ("qformer.models", "qformer.data"):
            return []
        raise


def _registered_class(kind: str, name: str) -> type | None:
    if name not in _registered(kind):
        return None
    return {"model": registry.get_model_class, "builder": registry.get_builder_class,
            "processor": registry.get_processor_class}[kind](name)


def _from_class_table(cls: type, table: str, key: str) -> Path | None:
    """LAVIS-style PRETRAINED_MODEL_CONFIG_DICT / DATASET_CONFIG_DICT on a user-registered class."""
    entries = getattr(cls, table, None) or {}
    if key not in entries:
        return None
    path = Path(entries[key])
    if not path.is_absolute():
        spec = importlib.util.find_spec(cls.__module__)
        base = Path(spec.origin).parent if spec and spec.origin else Path.cwd()
        path = base / path
    return path


def model_defaults(arch: str, model_type: str, source_arch: str, source_type: str) -> Path | None:
    """The model default YAML for arch + model_type; ConfigError naming the bad key otherwise."""
    arch_dir = DEFAULTS_DIR / "models" / arch
    if arch_dir.is_dir():
        path = arch_dir / f"{model_type}.yaml"
        if path.is_file():
            return path
        types = _yaml_stems(arch_dir)
        raise ConfigError(f"no model defaults '{model_type}' for arch '{arch}' (known: {', '.join(types)})",
                          "model.model_type", source_type,
                          closest(model_type, types))
    cls = _registered_class("model", arch)
    if cls is None:
        known = sorted(set(_subdirs(DEFAULTS_DIR / "models")) | set(_registered("model")))
        raise ConfigError(f"unknown model arch '{arch}' (known: {', '.join(known)})", "model.arch", source_arch,
                          closest(arch, known))
    return _from_class_table(cls, "PRETRAINED_MODEL_CONFIG_DICT", model_type)


def dataset_defaults(name: str, type_: str, source_name: str, source_type: str) -> Path | None:
    """The builder's default YAML for `datasets.<name>.type`; ConfigError for unknown names."""
    name_dir = DEFAULTS_DIR / "datasets" / name
    if name_dir.is_dir():
        path = name_dir / f"{type_}.yaml"
        if path.is_file():
            return path
        types = _yaml_stems(name_dir)
        raise ConfigError(f"no dataset defaults '{type_}' for builder '{name}' (known: {', '.join(types)})",
                          f"datasets.{name}.type", source_type, closest(type_, types))
    cls = _registered_class("builder", name)
    if cls is None:
        known = sorted(set(_subdirs(DEFAULTS_DIR / "datasets")) | set(_registered("builder")))
        hint = closest(name, known)
        raise ConfigError(f"unknown dataset builder '{name}' (known: {', '.join(known)})", f"datasets.{name}",
                          source_name, f"datasets.{hint}" if hint else None)
    return _from_class_table(cls, "DATASET_CONFIG_DICT", type_)


def processor_known(name: str) -> list[str] | None:
    """None when `name` is a known processor, else the list of known names."""
    if name in BUILTIN_PROCESSORS:
        return None
    registered = _registered("processor")
    if name in registered:
        return None
    return sorted(set(BUILTIN_PROCESSORS) | set(registered))

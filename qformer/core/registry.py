"""Name -> class tables for the things users add their own of: models, dataset builders, processors.

Only these three are registries (unlike LAVIS, which routes everything through one); tasks,
runners and schedulers are plain functions chosen by config value.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, TypeVar

T = TypeVar("T")

_TABLES: dict[str, dict[str, type]] = {"model": {}, "builder": {}, "processor": {}}


class RegistryError(KeyError):
    """An unknown or duplicate registry name; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def _register(kind: str, name: str) -> Callable[[T], T]:
    def decorator(cls: T) -> T:
        table = _TABLES[kind]
        if name in table and table[name] is not cls:
            raise RegistryError(f"{kind} name '{name}' is already registered to {table[name].__qualname__}")
        table[name] = cls  # type: ignore[assignment]
        return cls

    return decorator


def register_model(name: str):
    """Class decorator: make a model class buildable by `model.arch: <name>`."""
    return _register("model", name)


def register_builder(name: str):
    """Class decorator: make a dataset builder usable as `datasets.<name>`."""
    return _register("builder", name)


def register_processor(name: str):
    """Class decorator: make a processor usable as `vis_processor/text_processor.<split>.name`."""
    return _register("processor", name)


def _ensure_builtins(kind: str) -> None:
    # Importing the packages runs their @register_* decorators; done lazily so that
    # `qformer config` does not pay for importing torch.
    module = {"model": "qformer.models", "builder": "qformer.data", "processor": "qformer.data"}[kind]
    importlib.import_module(module)


def _get(kind: str, name: str) -> type:
    table = _TABLES[kind]
    if name not in table:
        _ensure_builtins(kind)
    if name not in table:
        known = sorted(table)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RegistryError(f"unknown {kind} '{name}'.{hint} Known {kind}s: {', '.join(known) or '(none)'}")
    return table[name]


def get_model_class(name: str) -> type:
    return _get("model", name)


def get_builder_class(name: str) -> type:
    return _get("builder", name)


def get_processor_class(name: str) -> type:
    return _get("processor", name)


def list_names(kind: str) -> list[str]:
    _ensure_builtins(kind)
    return sorted(_TABLES[kind])

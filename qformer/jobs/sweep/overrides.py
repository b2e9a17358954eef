"""Sampled values -> `key=value` options, the same form `qformer train --options` takes.

Trials and the best-config writer build their config through `load_config(base, options)`, so a trial
resolves exactly like `qformer train --cfg-path base --options ...` would.
"""
from __future__ import annotations

from typing import Any

import yaml


def format_value(value: Any) -> str:
    """YAML text for one value; floats keep a '.' (3.0e-05) so YAML 1.1 loaders read them as floats too."""
    if hasattr(value, "item"):  # numpy scalars from Tune samplers
        value = value.item()
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return text.removesuffix("...").strip()


def sampled_options(sampled: dict[str, Any]) -> list[str]:
    return [f"{key}={format_value(value)}" for key, value in sampled.items()]

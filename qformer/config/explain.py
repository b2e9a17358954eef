"""Render a loaded config as YAML, optionally with each value's source layer as a comment."""
from __future__ import annotations

from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from qformer.config.schema import IGNORED

_COMMENT_COLUMN = 56


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def explain_yaml(cfg: DictConfig, sources: dict[str, str]) -> str:
    """YAML of `cfg` where every leaf line ends with `# <layer it came from>`."""
    lines: list[str] = []
    _emit(OmegaConf.to_container(cfg, resolve=True), "", 0, sources, lines)
    return "\n".join(lines) + "\n"


def _emit(node: dict, prefix: str, depth: int, sources: dict[str, str], lines: list[str]) -> None:
    pad = "  " * depth
    for key, value in node.items():
        path = prefix + str(key)
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{inline_yaml(key)}:")
            _emit(value, path + ".", depth + 1, sources, lines)
            continue
        text = f"{pad}{inline_yaml(key)}: {inline_yaml(value)}"
        note = sources.get(path, "default") + ("  (ignored by qformer)" if path in IGNORED else "")
        lines.append(f"{text.ljust(_COMMENT_COLUMN)}  # {note}")


def inline_yaml(value: Any) -> str:
    """One value as YAML flow text (null, true, 1.0e-05, [train], {a: 1})."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text

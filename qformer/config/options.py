"""`--options` overrides: LAVIS's dot-list (`run.init_lr=1e-3`) or alternating `key value` tokens.

Values are typed by YAML rules as OmegaConf reads them: 3 -> int, 1e-4 -> float, true -> bool,
null -> None, [a,b] -> list; anything else stays a string.
"""
from __future__ import annotations

import re
from typing import Any

from omegaconf import OmegaConf

from qformer.core.errors import ConfigError

SOURCE = "--options"
_KEY = re.compile(r"^[A-Za-z0-9_][\w\-]*(\.[A-Za-z0-9_][\w\-]*)*$")


def parse_options(tokens: list[str] | None) -> dict:
    """Nested dict of the overrides (later tokens win)."""
    if not tokens:
        return {}
    if "=" not in tokens[0]:  # LAVIS: `--options run.init_lr 1e-3 run.seed 7`
        if len(tokens) % 2:
            raise ConfigError(f"'key value' pairs expected, but '{tokens[-1]}' has no value", source=SOURCE)
        pairs = list(zip(tokens[0::2], tokens[1::2]))
    else:
        bad = [t for t in tokens if "=" not in t]
        if bad:
            raise ConfigError(f"'{bad[0]}' is not key=value", source=SOURCE)
        pairs = [tuple(t.split("=", 1)) for t in tokens]
    result: dict = {}
    for key, text in pairs:
        key = key.strip()
        if not _KEY.match(key):
            raise ConfigError(f"'{key}' is not a dotted key like run.init_lr", source=SOURCE)
        _set(result, key, typed_value(text))
    return result


def typed_value(text: str) -> Any:
    """The value as a YAML file would give it (interpolations like ${run.init_lr} kept)."""
    try:
        parsed = OmegaConf.from_dotlist([f"v={text}"])
        return OmegaConf.to_container(parsed, resolve=False)["v"]
    except Exception:  # noqa: BLE001 - e.g. an unbalanced bracket: keep the text as the user wrote it
        return text


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{'.'.join(parents[: i + 1])}' is set to a value and also used as a section",
                              key, SOURCE)
        node = child
    node[leaf] = value

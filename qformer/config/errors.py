"""The one exception type for bad configuration, with a one-line message that says where to look."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(Exception):
    """A config value or key is wrong.

    The message names the dotted key, the layer it came from (a file or `--options`) and,
    for a misspelt key or name, the closest valid one: the user fixes it without reading code.
    """

    def __init__(self, message: str, key: str | None = None, source: str | None = None,
                 suggestion: str | None = None) -> None:
        self.key, self.source, self.suggestion, self.reason = key, source, suggestion, message
        text = f"{key}: {message}" if key else message
        if source:
            text += f" (from {source})"
        if suggestion:
            text += f"; did you mean {suggestion}?"
        super().__init__(text)


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like `name` (a typo's likely intent), or None when nothing is close."""
    matches = difflib.get_close_matches(str(name), sorted(set(candidates)), n=1, cutoff=0.6)
    return matches[0] if matches else None

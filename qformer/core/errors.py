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

class AnnotationError(ValueError):
    """A malformed annotation file or record; raised before training starts.

    The message always names the file and, for record-level problems, the 0-based record index.
    """

    def __init__(self, path: str, message: str, index: int | None = None):
        where = f"{path}" if index is None else f"{path}, record {index}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.index = index


class ImageDecodeError(OSError):
    """An image that cannot be turned into RGB pixels; the pipeline skips and counts it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class CheckpointError(ValueError):
    """A checkpoint path given by the user is missing or is not a checkpoint; the message names it."""


class RayStartError(RuntimeError):
    """Ray could not be started or reached; the message says what to try."""

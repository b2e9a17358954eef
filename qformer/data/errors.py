"""Errors for bad data: both name the file (and record) so the user can fix the input."""
from __future__ import annotations


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

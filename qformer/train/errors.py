"""Errors the CLI reports as one line (exit 2) instead of a traceback: the user can act on them.

Kept free of heavy imports (torch, ray) so `qformer.cli` can name them cheaply.
"""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint path given by the user is missing or is not a checkpoint; the message names it."""


class RayStartError(RuntimeError):
    """Ray could not be started or reached; the message says what to try."""

"""Where data, run outputs and the default MLflow store live.

Everything defaults under one stable home (QFORMER_HOME, default ~/.qformer), never the process's
working directory: under `ray job submit` that is a temporary unpacked copy that vanishes.
"""
from __future__ import annotations

import os
from pathlib import Path


def qformer_home() -> Path:
    return Path(os.environ.get("QFORMER_HOME", "~/.qformer")).expanduser().resolve()


def data_root(configured: str | None = None) -> Path:
    """Root that relative annotation/image paths resolve against (LAVIS's cache_root).

    Priority: the config key `run.data_root`, then QFORMER_DATA_ROOT, then QFORMER_HOME/data.
    """
    value = configured or os.environ.get("QFORMER_DATA_ROOT")
    return Path(value).expanduser().resolve() if value else qformer_home() / "data"


def output_dir(configured: str) -> Path:
    """`run.output_dir`: absolute as given, relative ones under QFORMER_HOME/runs (LAVIS put them in its package)."""
    path = Path(configured).expanduser()
    return path if path.is_absolute() else qformer_home() / "runs" / path


def default_tracking_uri() -> str:
    """Embedded MLflow store used when neither run.mlflow.tracking_uri nor MLFLOW_TRACKING_URI is set."""
    return "sqlite:///" + str(qformer_home() / "mlflow" / "mlflow.db")


"""What a run records about itself: the flattened config as MLflow params, and the code's git commit."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

# MLflow limits (mlflow/utils/validation.py in 3.x)
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"run.init_lr": "0.0001", ...} within MLflow's key/value limits.

    Lists become their string form; values longer than 6000 chars are cut (the full YAML is an artifact);
    keys longer than 250 chars are dropped rather than mangled.
    """
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
            continue
        if len(name) > MAX_KEY:
            continue
        text = "null" if value is None else str(value)
        out[name] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."
    return out


def source_tags() -> dict[str, str]:
    """What MLflow's run page shows as the run's Source: the command that started it (`qformer train
    --cfg-path ...`), its entry point (the sub-command) and the code's commit."""
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    entry = next((a for a in argv[1:] if not a.startswith("-")), argv[0])
    return {"mlflow.source.name": " ".join(argv)[:500], "mlflow.source.type": "JOB",
            "mlflow.project.entryPoint": entry, "mlflow.source.git.commit": git_commit()}


def git_commit() -> str:
    """The commit of the code that runs (QFORMER_GIT_COMMIT wins: a `ray job` working dir has no .git)."""
    if os.environ.get("QFORMER_GIT_COMMIT"):
        return os.environ["QFORMER_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"

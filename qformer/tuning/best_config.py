"""The best trial's resolved config as a ready-to-run experiment YAML (`qformer train --cfg-path it`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from qformer.config import load_config
from qformer.tuning.overrides import sampled_options
from qformer.tuning.spec import SweepSpec


def resolve_trial_config(spec: SweepSpec, sampled: dict[str, Any]):
    """The config a trial trains with, minus the sweep's per-trial plumbing (run name, tracking URI)."""
    return load_config(str(spec.base_path), [*spec.base_options, *sampled_options(sampled)])


def write_best_config(spec: SweepSpec, sampled: dict[str, Any], path: Path, header: str = "") -> Path:
    cfg = resolve_trial_config(spec, sampled)
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + OmegaConf.to_yaml(cfg))
    return path


def retrain_command(path: Path) -> str:
    return f"qformer train --cfg-path {path}"

"""The best trial's resolved config as a ready-to-run experiment YAML (`qformer train --cfg-path it`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from qformer.config import load_config
from qformer.jobs.sweep.overrides import format_value, sampled_options
from qformer.jobs.sweep.spec import SweepSpec


def resolve_trial_config(spec: SweepSpec, sampled: dict[str, Any], extra: list[str] | None = None):
    """The config a trial trains with, minus the sweep's per-trial plumbing (run name, tracking URI)."""
    return load_config(str(spec.base_path), [*spec.base_options, *sampled_options(sampled), *(extra or [])])


def retrain_options(spec: SweepSpec, base_output_dir: str, trial_id: str) -> list[str]:
    """A run of its own: the base's output_dir and (derived) Ray run name belong to the base experiment's
    run, and `qformer train` resumes whatever run already has that name."""
    name = f"{spec.name}_best_{trial_id}"
    return [f"run.output_dir={format_value(f'{base_output_dir}/sweeps/{spec.name}/best_{trial_id}')}",
            f"run.ray.name={name}", f"run.mlflow.run_name={name}"]


def write_best_config(spec: SweepSpec, sampled: dict[str, Any], trial_id: str, path: Path, header: str = "") -> Path:
    base_output_dir = str(resolve_trial_config(spec, sampled).run.output_dir)
    cfg = resolve_trial_config(spec, sampled, retrain_options(spec, base_output_dir, trial_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + OmegaConf.to_yaml(cfg))
    return path


def retrain_command(path: Path) -> str:
    return f"qformer train --cfg-path {path}"

"""The sweep file: `base:` (an experiment YAML) + `options:` (overrides of it) + a `tune:` section.

```yaml
base: ../blip2/pretrain_stage1.yaml      # relative to this file, else to the working directory
options: [run.max_epoch=5]               # optional: --options applied to the base for every trial
tune:
  name: lr_queries                       # Tune experiment name (default: the file's stem)
  storage_path: null                     # default: <run.output_dir>/sweeps
  metric: val/r_mean
  mode: max
  num_samples: 8
  max_concurrent_trials: 2
  resources_per_trial: {CPU: 0.25}       # the trial driver; Train workers come from run.ray
  max_failures: 1                        # trial retries (a retry resumes its Train run)
  seed: null                             # random_state of the search, for repeatable samples
  search_space:
    run.init_lr: {loguniform: [1e-5, 3e-4]}
    model.num_query_token: {choice: [8, 16, 32]}
  scheduler: {type: asha, time_attr: training_iteration, max_t: 10, grace_period: 1, reduction_factor: 2}
```
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from qformer.core.errors import ConfigError
from qformer.jobs.sweep.search_space import SearchDim, parse_search_space

TOP_KEYS = {"base", "options", "tune"}
TUNE_KEYS = {
    "name", "storage_path", "metric", "mode", "num_samples", "max_concurrent_trials",
    "resources_per_trial", "max_failures", "seed", "search_space", "scheduler",
}
SCHEDULER_KEYS = {"type", "time_attr", "max_t", "grace_period", "reduction_factor"}
SCHEDULER_TYPES = ("asha", "fifo")


@dataclass(frozen=True)
class SchedulerSpec:
    type: str = "asha"
    time_attr: str = "training_iteration"  # or any reported counter, e.g. epoch / step
    max_t: int = 10
    grace_period: int = 1
    reduction_factor: float = 2


@dataclass(frozen=True)
class SweepSpec:
    sweep_path: Path
    base_path: Path
    base_options: list[str]
    name: str
    metric: str
    mode: str
    search_space: dict[str, SearchDim]
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"CPU": 0.25})
    max_failures: int = 0
    seed: int | None = None
    storage_path: str | None = None
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    options: tuple[str, ...] = ()  # the --options it was loaded with (a resume needs them again)

    def shown(self, path: Path) -> str:
        """How records name an input file: relative to the working directory when inside it. A `ray job`'s
        working directory is a temporary copy Ray deletes, so an absolute path there outlives nothing, while
        `experiments/sweeps/x.yaml` still names the file in the submitted repo (contents go in as artifacts)."""
        try:
            return str(path.relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(path)

    def mlflow_params(self) -> dict[str, Any]:
        """The sweep's settings as the parent MLflow run's params."""
        scheduler = self.scheduler
        return {
            "sweep_file": self.shown(self.sweep_path), "base": self.shown(self.base_path),
            "base_options": " ".join(self.base_options) or "-", "metric": self.metric, "mode": self.mode,
            "num_samples": self.num_samples, "max_concurrent_trials": self.max_concurrent_trials,
            "resources_per_trial": json.dumps(self.resources_per_trial), "scheduler": scheduler.type,
            "scheduler.time_attr": scheduler.time_attr, "scheduler.max_t": scheduler.max_t,
            "scheduler.grace_period": scheduler.grace_period, "scheduler.reduction_factor": scheduler.reduction_factor,
            **{f"search_space.{k}": f"{d.kind}{list(d.args)}" for k, d in self.search_space.items()},
        }

    def input_files(self) -> dict[str, Path]:
        """The files the sweep was made from, by the artifact folder they are logged under."""
        return {"inputs/sweep": self.sweep_path, "inputs/base": self.base_path}

    def command(self, *flags: str) -> str:
        """The `qformer tune` command line that loads this same sweep (plus flags, e.g. --resume)."""
        options = ["--options", *map(shlex.quote, self.options)] if self.options else []
        return " ".join(["qformer", "tune", "--cfg-path", self.shown(self.sweep_path), *options, *flags])


def load_sweep(path: str | Path, options: list[str] | None = None) -> SweepSpec:
    """Read and check a sweep file. `options` entries `tune.X=V` / `base=P` edit the sweep, the rest the base."""
    sweep_path = Path(path)
    if not sweep_path.is_file():
        raise ConfigError(f"sweep file not found: {sweep_path}")
    where = str(sweep_path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(sweep_path), resolve=True)  # OmegaConf reads 1e-5 as a float
    except Exception as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a sweep file is a mapping with keys {sorted(TOP_KEYS)}")
    base_cli = _apply_sweep_options(raw, options or [], where)

    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {sorted(unknown)}; expected {sorted(TOP_KEYS)}")
    if not raw.get("base"):
        raise ConfigError(f"{where}: base: the experiment YAML to sweep over is required")
    base_path = _resolve_base(str(raw["base"]), sweep_path)
    file_options = raw.get("options") or []
    if not isinstance(file_options, list) or not all(isinstance(o, str) and "=" in o for o in file_options):
        raise ConfigError(f"{where}: options must be a list of 'key=value' strings")

    tune = raw.get("tune")
    if not isinstance(tune, dict):
        raise ConfigError(f"{where}: tune: section is required")
    unknown = set(tune) - TUNE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {['tune.' + k for k in sorted(unknown)]}; expected tune.{{{', '.join(sorted(TUNE_KEYS))}}}")
    metric = tune.get("metric")
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"{where}: tune.metric is required (a metric the training reports, e.g. val/r_mean or loss)")
    mode = tune.get("mode")
    if mode not in ("min", "max"):
        raise ConfigError(f"{where}: tune.mode must be 'min' or 'max', got {mode!r}")

    return SweepSpec(
        sweep_path=sweep_path.resolve(),
        base_path=base_path,
        base_options=[*file_options, *base_cli],
        name=_name(tune.get("name") or sweep_path.stem, where),
        metric=metric,
        mode=mode,
        search_space=parse_search_space(tune.get("search_space"), where),
        num_samples=_int(tune, "num_samples", 1, where, minimum=1),
        max_concurrent_trials=_int(tune, "max_concurrent_trials", None, where, minimum=1),
        resources_per_trial=_resources(tune.get("resources_per_trial"), where),
        max_failures=_int(tune, "max_failures", 0, where, minimum=-1),
        seed=_int(tune, "seed", None, where, minimum=0),
        storage_path=tune.get("storage_path"),
        scheduler=_scheduler(tune.get("scheduler"), where),
        options=tuple(options or ()),
    )


def _apply_sweep_options(raw: dict, options: list[str], where: str) -> list[str]:
    """Apply `tune.*` / `base=` / `options=` overrides in place; return the others (for the base config)."""
    rest: list[str] = []
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise ConfigError(f"--options: expected key=value, got {opt!r}")
        if key in ("base",) or key == "tune" or key.startswith("tune."):
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
            if key == "base":
                raw["base"] = parsed
                continue
            parts = key.split(".")[1:]
            if parts[:1] == ["search_space"] and len(parts) > 1:
                parts = ["search_space", ".".join(parts[1:])]  # swept keys are themselves dotted
            node = raw.setdefault("tune", {})
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"--options {key}: {part} is not a mapping in {where}")
            if parts:
                node[parts[-1]] = parsed
            else:
                raw["tune"] = parsed
        else:
            rest.append(opt)
    return rest


def _resolve_base(base: str, sweep_path: Path) -> Path:
    candidates = [Path(base)] if Path(base).is_absolute() else [sweep_path.parent / base, Path.cwd() / base]
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f"{sweep_path}: base: {base} not found (looked at {', '.join(str(c) for c in candidates)})")


def _name(name: Any, where: str) -> str:
    name = str(name)
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"{where}: tune.name {name!r}: use letters, digits, '-', '_' or '.' (it names directories)")
    return name


def _int(section: dict, key: str, default: int | None, where: str, minimum: int) -> int | None:
    value = section.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: tune.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _resources(value: Any, where: str) -> dict[str, float]:
    if value is None:
        return {"CPU": 0.25}
    if not isinstance(value, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value.values()
    ):
        raise ConfigError(f"{where}: tune.resources_per_trial must map resource names (CPU, GPU, ...) to amounts >= 0")
    return {str(k): float(v) for k, v in value.items()}


def _scheduler(value: Any, where: str) -> SchedulerSpec:
    if value is None:
        return SchedulerSpec()
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: tune.scheduler must be a mapping with keys {sorted(SCHEDULER_KEYS)}")
    unknown = set(value) - SCHEDULER_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {['tune.scheduler.' + k for k in sorted(unknown)]}")
    kind = value.get("type", "asha")
    if kind not in SCHEDULER_TYPES:
        raise ConfigError(f"{where}: tune.scheduler.type must be one of {SCHEDULER_TYPES}, got {kind!r}")
    section = {k: v for k, v in value.items() if k != "type"}
    spec = SchedulerSpec(type=kind, **section)
    for key in ("max_t", "grace_period"):
        v = getattr(spec, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}: tune.scheduler.{key} must be an integer >= 1, got {v!r}")
    if spec.grace_period > spec.max_t:
        raise ConfigError(f"{where}: tune.scheduler.grace_period ({spec.grace_period}) exceeds max_t ({spec.max_t})")
    if not isinstance(spec.reduction_factor, (int, float)) or spec.reduction_factor <= 1:
        raise ConfigError(f"{where}: tune.scheduler.reduction_factor must be > 1, got {spec.reduction_factor!r}")
    if not isinstance(spec.time_attr, str) or not spec.time_attr:
        raise ConfigError(f"{where}: tune.scheduler.time_attr must name a reported counter (training_iteration, epoch, step)")
    return spec

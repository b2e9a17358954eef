"""Check every swept key against the config schema before any trial starts.

Each entry's probe values (every choice, both range ends) go through `load_config` as overrides, so an
unknown key or a value the schema rejects fails in the driver with the sweep file and key named. Then keys
bound by another key (init_lr above min_lr) are checked across the whole space: each value alone may be
valid while a sampled combination is not.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from qformer.config import load_config
from qformer.config.batch_plan import worker_range
from qformer.core.errors import ConfigError
from qformer.jobs.sweep.overrides import format_value
from qformer.jobs.sweep.search_space import SearchDim
from qformer.jobs.sweep.spec import SweepSpec

_ABSENT = object()


def validate_sweep(spec: SweepSpec) -> DictConfig:
    """Return the resolved base config; raise ConfigError naming `tune.search_space.<key>` on a bad entry."""
    where = str(spec.sweep_path)
    try:
        base = load_config(str(spec.base_path), list(spec.base_options))
    except ConfigError as err:
        raise ConfigError(f"{where}: base {spec.base_path}: {err}") from err
    if worker_range(base.run.ray.num_workers)[1] == 0:  # measured: every trial errors in Train local mode
        raise ConfigError(f"{where}: run.ray.num_workers is 0 (Train local mode): a trial reports its results to "
                          f"Tune through the Train controller, so each needs at least 1 Train worker; set "
                          f"run.ray.num_workers=1 (or more) in the sweep's options")
    for dim in spec.search_space.values():
        _check_dim(dim, base, spec, where)
    _check_bounds(spec, base, where)
    return base


# (lower key, upper key, when the bound matters, what crossing it does). Only decaying schedules use min_lr;
# warmup_lr -1 means "no warm-up".
DECAYING = ("linear_warmup_cosine_lr", "linear_warmup_step_lr")
BOUNDS: tuple[tuple[str, str, Any, str], ...] = (
    ("run.min_lr", "run.init_lr", lambda v: any(s in DECAYING for s in v("run.lr_sched")),
     "the learning rate would rise while it decays"),
    ("run.warmup_lr", "run.init_lr", lambda v: max(v("run.warmup_steps")) > 0 and max(v("run.warmup_lr")) >= 0,
     "warm-up would start above the rate it warms up to"),
)


def _check_bounds(spec: SweepSpec, base: DictConfig, where: str) -> None:
    """Refuse a space where some sampled value of one key crosses another key's value (swept or from the base)."""
    def values(key: str) -> list[Any]:
        dim = spec.search_space.get(key)
        return dim.probe_values() if dim else [OmegaConf.select(base, key)]

    for low_key, high_key, applies, harm in BOUNDS:
        swept = [k for k in (high_key, low_key) if k in spec.search_space]
        if not swept or not applies(values):
            continue
        highest_low, lowest_high = max(values(low_key)), min(values(high_key))
        if highest_low > lowest_high:
            key = swept[0]
            dim = spec.search_space[key]
            other = f"{low_key} ({highest_low:g})" if key == high_key else f"{high_key} ({lowest_high:g})"
            side = "below" if key == high_key else "above"
            raise ConfigError(
                f"{where}: tune.search_space.{key}: {dim.kind} {list(dim.args)!r} samples "
                f"{lowest_high if key == high_key else highest_low:g}, {side} {other}: {harm}; "
                f"keep {high_key} >= {low_key} over the whole search space")


def _check_dim(dim: SearchDim, base: DictConfig, spec: SweepSpec, where: str) -> None:
    name = f"tune.search_space.{dim.key}"
    current = OmegaConf.select(base, dim.key, default=_ABSENT)
    if isinstance(current, (DictConfig, list)) or OmegaConf.is_list(current):
        raise ConfigError(f"{where}: {name}: {dim.key} is a section, not a single value; sweep one of its keys")
    if current is not _ABSENT and current is not None:
        _check_type(dim, current, name, where)
    for value in dim.probe_values():
        try:
            with _quiet_config():
                cfg = load_config(str(spec.base_path), [*spec.base_options, f"{dim.key}={format_value(value)}"])
        except ConfigError as err:
            raise ConfigError(f"{where}: {name}: value {value!r} rejected: {err}") from err
        if OmegaConf.select(cfg, dim.key, default=_ABSENT) is _ABSENT:
            raise ConfigError(f"{where}: {name}: {dim.key} is not a config key")


def _check_type(dim: SearchDim, current: Any, name: str, where: str) -> None:
    """Catch sweeps the schema might coerce silently (e.g. a float learning rate into an int key)."""
    if isinstance(current, bool):
        ok = all(isinstance(v, bool) for v in dim.probe_values())
        want = "true/false values (choice or grid)"
    elif isinstance(current, int):
        ok = not dim.produces_floats() and all(
            isinstance(v, int) and not isinstance(v, bool) for v in dim.probe_values()
        )
        want = "integers (choice, grid or randint)"
    elif isinstance(current, float):
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dim.probe_values())
        want = "numbers"
    elif isinstance(current, str):
        ok = dim.kind in ("choice", "grid") and all(isinstance(v, str) for v in dim.probe_values())
        want = "strings (choice or grid)"
    else:
        return
    if not ok:
        raise ConfigError(
            f"{where}: {name}: {dim.key} is {type(current).__name__} (currently {current!r}); "
            f"{dim.kind} {list(dim.args)!r} does not give {want}"
        )


@contextmanager
def _quiet_config() -> Iterator[None]:
    """Probe loads repeat the base's "ignored LAVIS key" warnings: show them once (the base load), not per probe."""
    log = logging.getLogger("qformer.config")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)

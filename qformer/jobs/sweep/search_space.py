"""Search-space entries from YAML (`{loguniform: [lo, hi]}`, `{choice: [...]}`, ...) -> Ray Tune domains.

Kept free of Ray imports at module level so the sweep file can be checked (and unit-tested) fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qformer.core.errors import ConfigError

# kind -> (number of arguments it takes, what they mean) for error messages.
KINDS: dict[str, str] = {
    "loguniform": "[low, high] floats, 0 < low < high",
    "uniform": "[low, high] numbers, low < high",
    "quniform": "[low, high, q]",
    "qloguniform": "[low, high, q], 0 < low < high",
    "randint": "[low, high] ints, high exclusive",
    "choice": "a non-empty list of values",
    "grid": "a non-empty list of values (every value is tried, times num_samples)",
}


@dataclass(frozen=True)
class SearchDim:
    """One swept config key and how to sample it."""

    key: str  # dotted config key, e.g. run.init_lr
    kind: str
    args: tuple[Any, ...]

    def to_tune(self) -> Any:
        """The Ray Tune domain (imported lazily: Tune is heavy)."""
        from ray import tune  # lazy: a sweep file loads and validates without Ray

        a = self.args
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1])
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "quniform":
            return tune.quniform(a[0], a[1], a[2])
        if self.kind == "qloguniform":
            return tune.qloguniform(a[0], a[1], a[2])
        if self.kind == "randint":
            return tune.randint(a[0], a[1])
        if self.kind == "choice":
            return tune.choice(list(a))
        if self.kind == "grid":
            return tune.grid_search(list(a))
        raise AssertionError(self.kind)

    def probe_values(self) -> list[Any]:
        """Values that stand for everything this entry can produce, for validating against the schema."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [float(self.args[0]), float(self.args[1])]

    def produces_floats(self) -> bool:
        """Whether sampled values are non-integral floats (matters for int-typed keys)."""
        return self.kind in ("loguniform", "uniform", "quniform", "qloguniform")  # Tune returns floats


def parse_search_space(raw: Any, where: str) -> dict[str, SearchDim]:
    """Parse the `tune.search_space` mapping; `where` names the file for error messages."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: tune.search_space must be a non-empty mapping of config key -> {{kind: args}}")
    return {str(key): parse_dim(str(key), spec, where) for key, spec in raw.items()}


def parse_dim(key: str, spec: Any, where: str) -> SearchDim:
    name = f"tune.search_space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: {name} must be one of {{{', '.join(KINDS)}}}: <args>, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(f"{where}: {name}: unknown sampler {kind!r}; use one of {', '.join(KINDS)}")
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"{where}: {name}.{kind} takes {KINDS[kind]}, got {args!r}")
    args = tuple(args)
    if kind in ("choice", "grid"):
        return SearchDim(key, kind, args)
    want = 3 if kind.startswith("q") else 2
    if len(args) != want or not all(_is_number(x) for x in args):
        raise ConfigError(f"{where}: {name}.{kind} takes {KINDS[kind]}, got {list(args)!r}")
    low, high = args[0], args[1]
    if not low < high:
        raise ConfigError(f"{where}: {name}.{kind}: low must be < high, got {list(args)!r}")
    if "loguniform" in kind and low <= 0:
        raise ConfigError(f"{where}: {name}.{kind}: bounds must be > 0 on a log scale, got {list(args)!r}")
    if kind == "randint" and not all(isinstance(x, int) for x in args):
        raise ConfigError(f"{where}: {name}.randint takes integer bounds, got {list(args)!r}")
    if kind.startswith("q") and not args[2] > 0:
        raise ConfigError(f"{where}: {name}.{kind}: q must be > 0, got {args[2]!r}")
    return SearchDim(key, kind, args)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

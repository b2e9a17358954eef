"""Value rules that a type and a range cannot say; each returns an error message or None."""
from __future__ import annotations

from typing import Any

from qformer.config.packaged import processor_known
from qformer.core.errors import closest


def non_empty(value: Any) -> str | None:
    return "must not be empty" if isinstance(value, str) and not value.strip() else None


def vit_model(value: str) -> str | None:
    if value in ("eva_clip_g", "clip_L"):
        return None
    if value.startswith("timm:") and len(value) > len("timm:"):
        return None
    return f"unknown vision encoder '{value}' (use eva_clip_g, clip_L or timm:<model name>)"


def warmup_lr(value: float) -> str | None:
    return None if value >= 0 or value == -1 else "must be >= 0, or -1 to start warm-up at run.init_lr"


def processor(value: dict) -> str | tuple[str, str | None] | None:
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return "a processor needs a 'name' (e.g. {name: blip_caption})"
    known = processor_known(name)
    if known is not None:
        return f"unknown processor '{name}' (known: {', '.join(known)})", closest(name, known)
    return None


def dataset_ratios(value: dict) -> str | None:
    for name, ratio in value.items():
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
            return f"ratio for '{name}' must be a positive number, got {ratio!r}"
    return None


def num_workers(value: Any) -> str | None:
    """run.ray.num_workers: an int >= 0 (fixed size; 0 = local mode) or [min, max] (elastic)."""
    if isinstance(value, int):
        return None if value >= 0 else "must be >= 0"
    if (len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and 1 <= value[0] <= value[1]):
        return None
    return f"must be an int >= 0 (a fixed size) or [min, max] with 1 <= min <= max (elastic), got {value!r}"


def concurrency(value: Any) -> str | None:
    if isinstance(value, int):
        return None if value >= 1 else "must be >= 1"
    if (len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and 1 <= value[0] <= value[1]):
        return None
    return f"must be an int >= 1 or [min, max] with 1 <= min <= max, got {value!r}"


def shard_spec(value: Any) -> str | None:
    items = [value] if isinstance(value, str) else value
    if not items or not all(isinstance(v, str) and v.strip() for v in items):
        return f"must be a shard pattern or a non-empty list of them, got {value!r}"
    return None

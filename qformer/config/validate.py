"""Check a merged config against the schema table and fill in every default.

Works on plain containers (dict/list/scalars) after interpolation; raises ConfigError at the
first problem, naming the dotted key and the layer it came from.
"""
from __future__ import annotations

import copy
import math
import os
import re
from typing import Any, Callable

from omegaconf import OmegaConf

from qformer.config import batch_plan
from qformer.core import registry
from qformer.core.errors import ConfigError, closest
from qformer.config.schema import IGNORED, REQUIRED, SCHEMA, Key

SourceOf = Callable[[str], "str | None"]
_IGNORE = object()  # schema-tree marker for IGNORED keys

# A float YAML 1.1 reads as a string (`1e-4` has no dot), as PyYAML does; OmegaConf already
# reads it as a float, but a config built from yaml.safe_load output must load the same.
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_KIND_TEXT = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false",
              "list": "a list", "map": "a mapping"}


def _build_tree() -> dict:
    tree: dict = {}
    for table, marker in ((SCHEMA, None), (IGNORED, _IGNORE)):
        for path, key in table.items():
            node = tree
            *parents, leaf = path.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = key if marker is None else marker
    return tree


TREE = _build_tree()
ALL_KEYS = [*SCHEMA, *IGNORED]


def is_section(path: str) -> bool:
    """True when the dotted path is a schema section (a group of keys), not a value."""
    node: object = TREE
    for part in path.split("."):
        if not isinstance(node, dict):
            return False
        node = node.get(part, node.get("*"))
    return isinstance(node, dict)


def is_named_entry(path: str) -> bool:
    """True when the path's last part is a name the user chooses (a `*` in the schema: a dataset, a split)."""
    node: object = TREE
    *parents, last = path.split(".")
    for part in parents:
        if not isinstance(node, dict):
            return False
        node = node.get(part, node.get("*"))
    return isinstance(node, dict) and last not in node and "*" in node


def validate(config: dict, source_of: SourceOf) -> tuple[dict, list[tuple[str, Any]]]:
    """Returns (config with all defaults filled and numbers coerced, [(ignored key, value)])."""
    ignored: list[tuple[str, Any]] = []
    result = _walk(TREE, config, "", source_of, ignored)
    _cross_check(result, source_of)
    return result, ignored


def _walk(schema: dict, value: dict, path: str, source_of: SourceOf, ignored: list) -> dict:
    result: dict = {}
    for raw_key, item in value.items():
        key = str(raw_key)
        child = f"{path}.{key}" if path else key
        spec = schema.get(key, schema.get("*"))
        if spec is None:
            raise ConfigError("unknown key", child, source_of(child), _suggest(key, schema, path))
        if spec is _IGNORE:
            ignored.append((child, item))
            result[key] = item
        elif isinstance(spec, dict):
            if item is None:  # an empty YAML section (`run.ray:` with nothing below it)
                item = {}
            if not isinstance(item, dict):
                raise ConfigError(f"expected a section (a mapping of keys), got {_show(item)}", child,
                                  source_of(child))
            result[key] = _walk(spec, item, child, source_of, ignored)
        else:
            result[key] = _check_leaf(spec, item, child, source_of)
    for key, spec in schema.items():
        if key == "*" or key in result or spec is _IGNORE:
            continue
        child = f"{path}.{key}" if path else key
        if isinstance(spec, dict):
            result[key] = _walk(spec, {}, child, source_of, ignored)
        elif spec.default is REQUIRED:
            raise ConfigError(f"missing required value (set it in the experiment file or with --options {child}=...)",
                              child)
        else:
            result[key] = copy.deepcopy(spec.default)
    # Schema order (the table's reading order), then wildcard entries and ignored keys as given.
    order = [k for k in schema if k in result] + [k for k in result if k not in schema]
    return {k: result[k] for k in order}


def _suggest(key: str, schema: dict, path: str) -> str | None:
    """A sibling key spelt alike, else the same key in another section (run.num_query_token -> model.)."""
    hint = closest(key, [k for k in schema if k != "*"])
    if hint:
        return f"{path}.{hint}" if path else hint
    elsewhere = [k for k in ALL_KEYS if k.rsplit(".", 1)[-1] == key]
    return elsewhere[0] if elsewhere else None


def _show(value: Any) -> str:
    kind = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__)
    return f"{kind} {value!r}"


def _check_leaf(spec: Key, value: Any, path: str, source_of: SourceOf) -> Any:
    def fail(message: str, suggestion: str | None = None) -> ConfigError:
        return ConfigError(message, path, source_of(path), suggestion)

    if value == "???":
        raise fail("missing required value ('???')")
    if value is None:
        if spec.null:
            return None
        raise fail(f"must not be null (expected {_expected(spec)})")
    kinds = spec.kind.split("|")
    value = _coerce(kinds, value)
    if not any(_is_kind(k, value) for k in kinds):
        raise fail(f"expected {_expected(spec)}, got {_show(value)}")
    if spec.items:
        for i, element in enumerate(value):
            if not _is_kind(spec.items, element):
                raise fail(f"element {i} must be {_KIND_TEXT[spec.items]}, got {_show(element)}")
    if spec.choices and not any(value == c and type(value) is type(c) for c in spec.choices):
        allowed = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in spec.choices)
        hint = closest(value, [c for c in spec.choices if isinstance(c, str)]) if isinstance(value, str) else None
        raise fail(f"must be one of {allowed}, got {value!r}", hint)
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(f"must be a finite number, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for bound, ok, text in ((spec.ge, lambda b: value >= b, ">="), (spec.gt, lambda b: value > b, ">"),
                                (spec.le, lambda b: value <= b, "<="), (spec.lt, lambda b: value < b, "<")):
            if bound is not None and not ok(bound):
                raise fail(f"must be {text} {bound:g}, got {value!r}")
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            message, hint = problem if isinstance(problem, tuple) else (problem, None)
            raise fail(message, hint)
    return value


def _expected(spec: Key) -> str:
    text = " or ".join(_KIND_TEXT[k] for k in spec.kind.split("|"))
    return text + " or null" if spec.null else text


def _coerce(kinds: list[str], value: Any) -> Any:
    if "str" in kinds and isinstance(value, os.PathLike):  # Path objects from code building a config
        return os.fspath(value)
    if "float" in kinds:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
    return value


def _is_kind(kind: str, value: Any) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {"str": str, "float": float, "bool": bool, "list": list, "map": dict}[kind])


def _cross_check(cfg: dict, source_of: SourceOf) -> None:
    """Rules between keys."""
    ratios = cfg["run"]["train_dataset_ratios"]
    for name in ratios or {}:
        if name not in cfg["datasets"]:
            key = f"run.train_dataset_ratios.{name}"
            raise ConfigError(f"'{name}' is not one of the configured datasets ({', '.join(cfg['datasets'])})",
                              key, source_of(key), closest(name, cfg["datasets"]))
    run = cfg["run"]
    for name, ds in cfg["datasets"].items():
        if not ds["build_info"]["annotations"] and ds["build_info"]["storage"] is None:
            key = f"datasets.{name}.build_info"
            raise ConfigError("names no data: set annotations.<split>.storage (annotation files) or storage "
                              "(image-text shards)", key, source_of(key))
        if ds["build_info"]["annotations"] and not ds["build_info"]["images"]["storage"]:
            key = f"datasets.{name}.build_info.images.storage"
            raise ConfigError("must not be null: it is the image directory of the annotation files (set it in the "
                              f"experiment file or with --options {key}=...)", key, source_of(key))
    for split_key in ("train_splits", "valid_splits", "test_splits"):
        for split in run[split_key] if cfg["datasets"] else []:
            if split_key != "train_splits" and "/" in split:  # <dataset>/<split>: one dataset's split
                _check_qualified_split(cfg["datasets"], split, f"run.{split_key}", source_of)
                continue
            having = [n for n, d in cfg["datasets"].items() if split in dataset_splits(d)]
            if split_key != "train_splits" and len(having) > 1:
                key = f"run.{split_key}"
                raise ConfigError(f"'{split}' is a split of several datasets ({', '.join(having)}); evaluation reads "
                                  f"one: name it as {' or '.join(f'{n}/{split}' for n in having)}", key, source_of(key))
            if not having:
                key = f"run.{split_key}"
                known = sorted({s for d in cfg["datasets"].values() for s in dataset_splits(d)})
                raise ConfigError(f"no dataset has a '{split}' split (datasets.*.build_info.annotations has: "
                                  f"{', '.join(known) or 'nothing'})", key, source_of(key), closest(split, known))
    model = cfg["model"]
    for flag, path in (("load_finetuned", "finetuned"), ("load_pretrained", "pretrained")):
        if model[flag] and not model[path]:
            raise ConfigError(f"is empty but model.{flag} is true (give a checkpoint path/URL or set {flag}: false)",
                              f"model.{path}", source_of(f"model.{flag}"))
    if not model["freeze_vit"] and model["vit_precision"] == "fp16":
        # a trainable fp16 ViT: GradScaler refuses to unscale fp16 gradients (the first step fails on a GPU)
        # and AdamW would update fp16 weights; LAVIS's configs that train the ViT use fp32
        raise ConfigError("is fp16 but model.freeze_vit is false: a trained ViT must be fp32 (set "
                          "model.vit_precision: fp32; autocast still runs its matmuls in half precision)",
                          "model.vit_precision", source_of("model.vit_precision") or source_of("model.freeze_vit"))
    _check_image_sizes(cfg, source_of)
    if run["runner"] == "runner_iter":
        for key in ("max_iters", "iters_per_inner_epoch"):
            if run[key] is None:
                raise ConfigError("runner_iter needs run.max_iters and run.iters_per_inner_epoch", f"run.{key}",
                                  source_of("run.runner"))
    _check_elastic(run, source_of)


def _check_qualified_split(datasets: dict, entry: str, key: str, source_of: SourceOf) -> None:
    """`<dataset>/<split>` in run.valid_splits / run.test_splits: that dataset must be configured with that split."""
    name, _, split = entry.rpartition("/")
    if name not in datasets:
        raise ConfigError(f"'{entry}' names no configured dataset ({', '.join(datasets)})", key, source_of(key),
                          closest(name, list(datasets)))
    if split not in dataset_splits(datasets[name]):
        known = sorted(dataset_splits(datasets[name]))
        raise ConfigError(f"dataset '{name}' has no '{split}' split (it has: {', '.join(known) or 'nothing'})", key,
                          source_of(key), closest(split, known))


def _check_elastic(run: dict, source_of: SourceOf) -> None:
    """The global batch the smallest world must keep (qformer.config.batch_plan), named by key and layer."""
    try:
        batch_plan.check(OmegaConf.create(run))
    except ConfigError as err:
        source = source_of(err.key) or source_of("run.elastic.global_batch") or source_of("run.batch_size_train")
        raise ConfigError(err.reason, err.key, source) from None


def dataset_splits(ds: dict) -> set[str]:
    """The splits a dataset entry has: its annotation files', plus train when it names shards."""
    return set(ds["build_info"]["annotations"]) | ({"train"} if ds["build_info"]["storage"] is not None else set())


def _check_image_sizes(cfg: dict, source_of: SourceOf) -> None:
    """Each image processor a run uses must produce model.image_size pixels (the ViT's position
    embeddings are built for it): checked here so `qformer config` catches it, not a Ray worker."""
    run, model_size = cfg["run"], cfg["model"]["image_size"]
    preprocess = (cfg.get("preprocess") or {}).get("vis_processor") or {}
    for name, ds in cfg["datasets"].items():
        splits = dataset_splits(ds)
        evaluated = set(run["valid_splits"]) | set(run["test_splits"])
        used = {"train": bool(splits & set(run["train_splits"])),
                "eval": bool(splits & evaluated) or any(f"{name}/{s}" in evaluated for s in splits)}
        for kind, in_use in used.items():
            node = (ds.get("vis_processor") or {}).get(kind)
            key = f"datasets.{name}.vis_processor.{kind}"
            if node is None:
                node, key = preprocess.get(kind), f"preprocess.vis_processor.{kind}"
            size = getattr(_build_processor(node), "image_size", None) if in_use and node else None
            if size is not None and size != model_size:
                given = f"{key}.image_size" if "image_size" in node else key  # else: the processor's default
                raise ConfigError(f"image_size {size} differs from model.image_size {model_size} (processors must "
                                  f"produce the ViT's input size)", f"{key}.image_size",
                                  source_of(given) or source_of("model.image_size"))


def _build_processor(node: dict):
    """The processor a config node names, through the registry (which imports the built-in ones itself)."""
    if not node.get("name"):
        return None
    return registry.get_processor_class(str(node["name"])).from_config(node)

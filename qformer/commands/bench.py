"""Run benchmarks; each writes JSON under experiments/benchmarks/results/ and prints its ratios.

`qformer bench all` runs every suite in one process so the baselines share the machine state.
"""
from __future__ import annotations

import argparse
import importlib

# suite -> module exposing add_arguments(parser) and run(args) -> dict (the written payload)
SUITES: dict[str, str] = {"data": "qformer.bench.data", "step": "qformer.bench.step", "cache": "qformer.bench.cache",
                          "train": "qformer.bench.train", "device": "qformer.bench.device",
                          "elastic": "qformer.bench.elastic", "vit-precision": "qformer.bench.vit_precision",
                          "prepare": "qformer.bench.prepare",
                          "capfilt": "qformer.bench.capfilt", "demo": "qformer.bench.demo"}
# `device` is a check for a lent GPU machine, `elastic` starts simulated clusters (minutes), `vit-precision`
# runs a full-size ViT-g three times (a minute on a CPU), `demo` runs the whole demo: each runs on its own
IN_ALL = ("data", "step", "cache", "train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, module_name in SUITES.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_suite=module)
    p_all = sub.add_parser("all", help="every suite, in one run")
    p_all.add_argument("--cfg-path", default="experiments/demo/tiny_shapes.yaml")
    p_all.add_argument("--quick", action="store_true", help="small sizes (seconds, for CI smoke runs)")


def run(args: argparse.Namespace) -> int:
    if args.suite != "all":
        args._suite.run(args)
        return 0
    for name in IN_ALL:
        module = importlib.import_module(SUITES[name])
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        sub_args = parser.parse_args(_shared_flags(parser, args))
        print(f"== bench {name}")
        module.run(sub_args)
    return 0


def _shared_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    known = {a.dest for a in parser._actions}
    flags: list[str] = []
    if "cfg_path" in known:
        flags += ["--cfg-path", args.cfg_path]
    if "quick" in known and args.quick:
        flags.append("--quick")
    return flags

"""`qformer` console script: one sub-command per module in qformer/commands/.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`. Building the parser
imports every command module (and, through `qformer bench`, every bench suite), so each keeps its
top-level imports light (standard library, qformer.core) and imports its work inside `run()`
(marked `# lazy:`): `qformer --help` and `qformer config` start fast and never import torch or Ray
(tests/test_cli.py checks the latter).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from qformer.core.errors import AnnotationError, CheckpointError, ConfigError, RayStartError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("qformer.commands.config", "print the resolved experiment config"),
    "train": ("qformer.commands.train", "train on Ray Train (LAVIS --cfg-path/--options), tracked in MLflow"),
    "demo": ("qformer.commands.demo", "offline demo: synthetic data, tiny model, retrieval before/after"),
    "data": ("qformer.commands.data", "fetch COCO/VG (download), web shards (prepare), CapFilt captions (capfilt), synthetic data (synth), checks (check)"),
    "weights": ("qformer.commands.weights", "fetch the pretrained weights the configs name (EVA/CLIP ViT, BERT, BLIP-2)"),
    "eval": ("qformer.commands.eval", "evaluate a checkpoint: retrieval R@1/5/10 (LAVIS), logged to MLflow"),
    "tune": ("qformer.commands.tune", "hyper-parameter sweep (Ray Tune + ASHA) over a base experiment"),
    "bench": ("qformer.commands.bench", "benchmarks (data, step, train, cache, all) as JSON ratios"),
    "cache-features": ("qformer.commands.cache_features", "run the frozen ViT once per image/view into a feature cache"),
    "export-hf": ("qformer.commands.export_hf", "export a checkpoint as a transformers BLIP-2 directory"),
    "ui": ("qformer.commands.ui", "the MLflow UI for the platform's tracking store, at the latest run"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qformer", description="BLIP-2 stage-1 Q-Former pretraining on Ray + MLflow")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)  # for its arguments; run() imports its work (see above)
        # the module docstring as written: paragraphs and example lines keep their line breaks
        cmd = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qformer-platform")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `qformer`: the command table, not an argparse error
        parser.print_help()
        return 0
    try:
        return int(args._module.run(args) or 0)
    except (ConfigError, AnnotationError, CheckpointError, RayStartError) as err:  # one clear line, no traceback
        print(f"qformer {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

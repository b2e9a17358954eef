"""Offline end-to-end demo: synthesise the shapes data set if missing, train the tiny BLIP-2 for a few
minutes on a local Ray (CPU is fine), and print retrieval before/after, the checkpoint and MLflow run."""
from __future__ import annotations

import argparse

from qformer.core.logs import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg-path", default=None, help="demo experiment (default experiments/demo/tiny_shapes.yaml)")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides, e.g. run.max_epoch=1")
    parser.add_argument("--fresh", action="store_true",
                        help="train again even if this demo already finished (its checkpoints are removed)")


def run(args: argparse.Namespace) -> int:
    # lazy: `qformer --help` imports every command module (see qformer/cli.py)
    from qformer.jobs.demo import run_demo

    setup_logging()
    run_demo(args.cfg_path, args.options, fresh=args.fresh)
    return 0

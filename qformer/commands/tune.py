"""Sweep hyper-parameters with Ray Tune: each trial trains the sweep's base experiment (as `qformer train`
would) with sampled values; ASHA stops weak trials early; MLflow gets one parent run with a child per trial.

  qformer tune --cfg-path experiments/sweeps/lr_queries.yaml --options tune.num_samples=4 run.max_epoch=2
  qformer tune --cfg-path experiments/sweeps/lr_queries.yaml --resume     # continue an interrupted sweep

--options: `tune.<key>=...` and `base=...` edit the sweep file, anything else overrides the base experiment.
"""
from __future__ import annotations

import argparse

from qformer.core.logs import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg-path", required=True, help="sweep YAML (base: <experiment yaml> + tune: section)")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides: tune.num_samples=2 (the sweep) or run.max_epoch=1 (the base experiment)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted sweep with this name (Tuner.restore, unfinished trials resume)")


def run(args: argparse.Namespace) -> int:
    # lazy: `qformer --help` imports every command module (see qformer/cli.py)
    from qformer.jobs.sweep.run import run_sweep
    from qformer.jobs.sweep.spec import load_sweep

    setup_logging()
    outcome = run_sweep(load_sweep(args.cfg_path, args.options), resume=args.resume)
    if outcome.interrupted:
        return 130  # like a shell's Ctrl+C: the sweep can be resumed
    return 0 if outcome.best is not None else 1

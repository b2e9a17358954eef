"""Evaluate a checkpoint on retrieval splits (LAVIS RetrievalTask metrics) and log it as its own MLflow run.

The checkpoint is one of ours (a Ray checkpoint directory or its checkpoint.pth) or a LAVIS .pth with
{"model": state_dict}. Workers: run.ray.num_workers Ray Train workers, or this process with --local (no Ray). Splits: --split (repeatable), else run.test_splits, else test.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg-path", required=True, help="experiment YAML (model + datasets with a val/test split)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or Ray checkpoint directory")
    parser.add_argument("--split", action="append", default=None, help="split to evaluate (repeatable)")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides, e.g. run.k_test=128 run.ray.num_workers=2")
    parser.add_argument("--local", action="store_true", help="evaluate in this process, without Ray")
    parser.add_argument("--no-mlflow", action="store_true", help="print the metrics only")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from qformer.config import load_config
    from qformer.logging_setup import setup_logging

    setup_logging()
    cfg = load_config(args.cfg_path, args.options)
    from qformer.evaluate.runner import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(cfg, args.checkpoint, args.split, track=not args.no_mlflow,
                                     local=args.local)
    except (FileNotFoundError, ValueError) as err:
        print(f"qformer eval: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    if result.mlflow_run_id:
        from qformer.evaluate.visuals import visual_artifacts
        from qformer.tracking import ui_hint

        print(f"MLflow run {result.mlflow_run_id} in {result.tracking_uri}\n  {ui_hint(result.tracking_uri)}")
        for path in visual_artifacts(result.tracking_uri, result.mlflow_run_id):
            print(f"  picture: {path}")
    return 0

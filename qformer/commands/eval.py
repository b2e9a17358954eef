"""Evaluate a checkpoint on retrieval splits (LAVIS RetrievalTask metrics) and log it as its own MLflow run.

The checkpoint is one of ours (a Ray checkpoint directory or its checkpoint.pth) or a LAVIS .pth with
{"model": state_dict}. Workers: run.ray.num_workers Ray Train workers, or this process with --local (no Ray). Splits: --split (repeatable; `<dataset>/<split>` names one data set's), else run.test_splits, else test.
`--benchmark paper`: COCO 5k + Flickr30K 1k test as the BLIP-2 paper reports them (qformer.jobs.paper_benchmark).
"""
from __future__ import annotations

import argparse
import json
import sys

from qformer.core.logs import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg-path", required=True, help="experiment YAML (model + datasets with a val/test split)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or Ray checkpoint directory")
    parser.add_argument("--split", action="append", default=None, help="split to evaluate (repeatable)")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides, e.g. run.k_test=128 run.ray.num_workers=2")
    parser.add_argument("--local", action="store_true", help="evaluate in this process, without Ray")
    parser.add_argument("--no-mlflow", action="store_true", help="print the metrics only")
    parser.add_argument("--benchmark", choices=["paper"], default=None,
                        help="paper: COCO 5k test and Flickr30K 1k test at LAVIS's settings, in the BLIP-2 paper's "
                             "table layout (the config's data sets are replaced; --split is ignored)")


def run(args: argparse.Namespace) -> int:
    # lazy: `qformer --help` imports every command module (see qformer/cli.py)
    from qformer.config import load_config

    setup_logging()
    cfg = load_config(args.cfg_path, args.options)
    # lazy: imported after the config, so its errors show before torch and Ray load (see qformer/cli.py)
    from qformer.jobs.eval_job import evaluate_checkpoint
    from qformer.jobs.paper_benchmark import run_paper_benchmark

    try:
        if args.benchmark == "paper":
            bench = run_paper_benchmark(cfg, args.checkpoint, local=args.local, track=not args.no_mlflow)
            result = bench["result"]
        else:
            result = evaluate_checkpoint(cfg, args.checkpoint, args.split, track=not args.no_mlflow,
                                         local=args.local)
    except (FileNotFoundError, ValueError) as err:
        print(f"qformer eval: {err}", file=sys.stderr)
        return 2
    if args.benchmark == "paper":
        print(bench["text"])
        if bench["json"]:
            print(f"table: {bench['json']}")
    else:
        print(json.dumps(result.metrics, indent=2, sort_keys=True))
    if result.mlflow_run_id:
        # lazy: `qformer --help` imports every command module (see qformer/cli.py)
        from qformer.evaluate.visuals import ARTIFACT_ROOT
        from qformer.tracking.run_tracker import artifact_files
        from qformer.tracking.uri import ui_hint

        print(f"MLflow run {result.mlflow_run_id} in {result.tracking_uri}\n  {ui_hint(result.tracking_uri)}")
        for path in artifact_files(result.tracking_uri, result.mlflow_run_id, ARTIFACT_ROOT, ".png"):
            print(f"  picture: {path}")
    return 0

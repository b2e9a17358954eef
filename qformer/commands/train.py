"""Train a BLIP-2 stage-1 Q-Former on Ray Train (LAVIS's `python train.py --cfg-path F --options k=v`).

Locally this starts a private Ray; with run.ray.address, RAY_ADDRESS, or inside `ray job submit` it
attaches to that cluster. Re-running the same command (same run.output_dir / run.ray.name) resumes
from the run's latest checkpoint; --resume PATH continues from a given checkpoint file or directory.
A resume whose model/datasets settings differ from the checkpoint's stops before Ray, listing the keys
(--allow-config-change continues anyway); a run that already finished is reported and left alone.
"""
from __future__ import annotations

import argparse

from qformer.core.logs import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg-path", required=True, help="experiment YAML (LAVIS schema)")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides, e.g. run.init_lr=1e-3 run.ray.num_workers=4")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="checkpoint file or directory to continue from (model, optimizer, LR position, step, MLflow run)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="continue from a checkpoint written with other model/datasets settings")


def run(args: argparse.Namespace) -> int:
    # lazy: `qformer --help` imports every command module (see qformer/cli.py)
    from qformer.config import load_config

    setup_logging()
    cfg = load_config(args.cfg_path, args.options)  # config errors surface before Ray starts
    # lazy: imported after the config, so its errors show before torch and Ray load (see qformer/cli.py)
    from qformer.jobs.train_job import launch_training

    result = launch_training(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    print(f"checkpoint: {result.checkpoint_path}")
    if result.best_checkpoint_path:
        print(f"best checkpoint: {result.best_checkpoint_path}")
    if result.mlflow_run_id:
        print(f"MLflow run {result.mlflow_run_id} at {result.tracking_uri}")
    return 0 if result.error is None else 1

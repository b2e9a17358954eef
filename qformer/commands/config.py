"""Print the resolved experiment config as YAML (all layers merged, validated, defaults filled).

--explain adds, after each value, the layer it came from: default, model defaults, dataset
defaults, the experiment file, or --options. --keys lists every accepted key instead.
"""
from __future__ import annotations

import argparse

from qformer.core.logs import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg-path", help="experiment YAML (LAVIS schema); required unless --keys")
    parser.add_argument("--options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides, e.g. run.init_lr=1e-3 model.model_type=tiny")
    parser.add_argument("--explain", action="store_true", help="annotate each value with its source layer")
    parser.add_argument("--keys", action="store_true", help="list every config key: type, default, notes")


def run(args: argparse.Namespace) -> int:
    # lazy: `qformer --help` imports every command module (see qformer/cli.py); light ones only, no torch
    from qformer.config import ConfigError, load_config
    from qformer.config.explain import explain_yaml, to_yaml

    if args.keys:
        # lazy: `qformer --help` imports every command module (see qformer/cli.py)
        from qformer.config.describe import describe_schema

        print(describe_schema(), end="")
        return 0
    if not args.cfg_path:
        raise ConfigError("--cfg-path is required (or use --keys to list the config keys)")
    setup_logging()
    cfg, sources = load_config(args.cfg_path, args.options, with_sources=True)
    print(explain_yaml(cfg, sources) if args.explain else to_yaml(cfg), end="")
    return 0

"""Pretrained weights: `fetch` downloads what the configs name, verified, for nodes without internet access.

  qformer weights fetch eva_vit_g bert-base-uncased [--to DIR|s3://b/p] [--mirror URL|HOST=URL ...]
  qformer weights list

Without --to the files go into the caches the loaders read (torch.hub's under TORCH_HOME, Hugging Face's
under HF_HOME), so the packaged configs load them offline unchanged; with --to they go into one folder (or
bucket prefix) and the command prints the --options that point the config at them. HF_ENDPOINT names a
Hugging Face mirror; --mirror a base URL replacing the host of the .pth URLs.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = sub.add_parser("fetch", help="download and verify weights by name (see `qformer weights list`)")
    f.add_argument("names", nargs="+", metavar="NAME")
    f.add_argument("--to", default=None, metavar="DIR|s3://...",
                   help="one folder or bucket prefix (default: torch.hub's and Hugging Face's caches)")
    f.add_argument("--mirror", action="append", default=[], metavar="URL|HOST=URL",
                   help="a base URL that replaces the host of the .pth URLs; repeatable")
    f.add_argument("--workers", type=int, default=4)
    sub.add_parser("list", help="the weights the configs name, their config keys and sources")


def run(args: argparse.Namespace) -> int:
    # lazy: `qformer --help` imports every command module (see qformer/cli.py)
    from qformer.core.logs import setup_logging
    from qformer.jobs.weights_fetch import WEIGHTS, fetch_weights, lookup

    if args.action == "list":
        for w in WEIGHTS.values():
            print(f"{w.name:24s} {w.key:18s} {w.about}  [{w.url or 'hf:' + w.hub_repo}]")
        return 0
    from qformer.core.http_fetch import parse_mirrors

    setup_logging()
    lookup(args.names)  # an unknown name fails before anything is fetched
    options, errors = fetch_weights(args.names, args.to, parse_mirrors(args.mirror), workers=args.workers)
    for name in args.names:
        if name in options:
            print(f"{name}: {options[name]}")
    if args.to and options:
        print("--options " + " ".join(options[n] for n in args.names if n in options))
    for error in errors:
        print(f"FAILED: {error}")
    return 1 if errors else 0

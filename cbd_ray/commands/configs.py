"""`cbd configs`: the built-in configs, each usable as `--config NAME` (or `cbd validate NAME`)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", action="store_true", help="print each config's file path too")


def run(args: argparse.Namespace) -> int:
    from cbd_ray.builtin import builtin_names, config_dir

    root = config_dir()
    for name in builtin_names():
        print(f"{name}\t{root / (name + '.yaml')}" if args.path else name)
    return 0

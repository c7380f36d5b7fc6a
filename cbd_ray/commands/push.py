"""`cbd push RUN_DIR --repo ORG/NAME`: upload a run's models (or one model directory) to the Hub.

One repo per model: ORG/NAME for one model, ORG/NAME-<model> for several. The uploaded card
carries the run's evaluation; machine paths are left out. Needs a Hub token (`hf auth login`
or HF_TOKEN). Prints one JSON line per model.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a chain run directory, or one model directory")
    parser.add_argument("--repo", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--targets", type=lambda s: [x for x in s.split(",") if x], default=None,
                        help="comma-separated model names of the run (default: all targets and anchors)")
    parser.add_argument("--private", action="store_true", help="create private repos")


def run(args: argparse.Namespace) -> int:
    from cbd_ray.push import push_run

    for rec in push_run(args.run_dir, args.repo, targets=args.targets, private=args.private):
        print(json.dumps(rec), flush=True)
    return 0

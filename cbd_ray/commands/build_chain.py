"""`cbd build-chain`: build a chain of anchors, interpolate the target grid, evaluate, report.

    cbd build-chain --config demo                     # a built-in config, a local Ray
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/build_chain.py --config configs/demo.yaml [key.sub=value ...] [--storage URI]

Reruns skip intact stages and resume cut-short ones. Exit 0 when every stage is done,
1 when a stage failed (the manifest says which and why), 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys


def add_config_arguments(parser: argparse.ArgumentParser, what: str = "chain config") -> None:
    """--config, dotted overrides and --storage: shared by the commands that run a config."""
    parser.add_argument("--config", required=True,
                        help=f"{what}: a YAML file or a built-in name (see `cbd configs`)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.steps=20 grid.actors=1")
    parser.add_argument("--storage", default=None, help="storage root (local path or URI) instead of run.storage")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--from-stage", default=None, help="redo this stage and every later one")
    parser.add_argument("--force", action="store_true", help="redo every stage (from --from-stage if given); "
                        "also takes over a run directory of another config")


def run(args: argparse.Namespace) -> int:
    from cbd_ray.builtin import resolve_config
    from cbd_ray.pipeline import StageFailed
    from cbd_ray.errors import one_line
    from cbd_ray.schema import load_config
    from cbd_ray.stages.chain import run_chain
    from cbd_ray.stages.rundir import resolve_run_dir

    cfg = load_config(resolve_config(args.config), args.overrides)
    try:
        run_chain(cfg, storage=args.storage, from_stage=args.from_stage, force=args.force,
                  after_stage=getattr(args, "after_stage", None))
    except StageFailed as exc:
        from cbd_ray.storage import redact, uri_join

        record = redact(uri_join(resolve_run_dir(cfg, args.storage)[0], "manifest.json"))
        print(f"cbd build-chain: error: {one_line(exc)} (the record: {record})", file=sys.stderr)
        return 1
    return 0

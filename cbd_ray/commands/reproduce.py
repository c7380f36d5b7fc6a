"""`cbd reproduce`: the paper's comparisons: CBD against Rand, Single, Direct KD and the Learngenes.

Builds or reuses the chain, searches α, initialises every method at every target shape,
fine-tunes each with the same budget, scores them the same way and writes report.md (a row
per method and target, loss curves, steps to the same loss, α sweep) in the run directory.
Exit 0 on success, 1 when a chain stage failed, 2 on bad input.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from cbd_ray.commands.build_chain import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "comparison config (reproduce_tiny, ...)")


def run(args: argparse.Namespace) -> int:
    from cbd_ray.builtin import resolve_config
    from cbd_ray.pipeline import StageFailed
    from cbd_ray.reproduce import load_reproduce_config, run_reproduce

    command = "cbd " + shlex.join(getattr(args, "argv", None) or ["reproduce", "--config", args.config])
    cfg, chain = load_reproduce_config(resolve_config(args.config), args.overrides)
    try:
        res = run_reproduce(cfg, chain, storage=args.storage, command=command)
    except StageFailed as exc:
        from cbd_ray.errors import one_line

        print(f"cbd reproduce: error: {one_line(exc)}", file=sys.stderr)
        return 1
    print(f"reproduce: {len(res['rows'])} rows -> {res['report']}", flush=True)
    return 0

"""`cbd tune`: Ray Tune searches over a chain: the best α per target shape and the chain density.

Builds or reuses the chain of the config, then writes tune/best_alpha.json ({target: α}) and
the α and density tables and plots in the run directory. Exit 0 ok, 1 a stage failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import sys

from cbd_ray.commands.build_chain import add_config_arguments


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--tune", action="append", default=[], metavar="KEY=VALUE",
                        help="search settings (cbd_ray.stages.tune.TuneSettings), e.g. --tune scheduler=fifo")
    parser.add_argument("--settings", default=None,
                        help="YAML file of search settings (a `tune` config; --tune and the flags override it)")
    parser.add_argument("--alphas", type=_floats, default=None, help="α grid, a,b,c")
    parser.add_argument("--recovery-steps", type=int, default=None, help="recovery training steps per trial")
    parser.add_argument("--densities", type=_ints, default=None, help="chain lengths to compare, a,b,c")
    parser.add_argument("--targets", type=lambda s: s.split(","), default=None, help="only these grid targets")
    parser.add_argument("--no-density", action="store_true", help="skip the chain-density search")


def run(args: argparse.Namespace) -> int:
    from cbd_ray.builtin import resolve_config
    from cbd_ray.config import apply_overrides, build, load_yaml
    from cbd_ray.pipeline import StageFailed
    from cbd_ray.schema import load_config
    from cbd_ray.stages.tune import TuneSettings, tune_chain

    cfg = load_config(resolve_config(args.config), args.overrides)
    base = load_yaml(resolve_config(args.settings)) if args.settings else {}
    given = {"alphas": args.alphas, "recovery_steps": args.recovery_steps, "densities": args.densities,
             "targets": args.targets}
    base.update({k: v for k, v in given.items() if v is not None})
    settings = build(TuneSettings, apply_overrides(base, args.tune), source="tune settings")
    try:
        res = tune_chain(cfg, settings, storage=args.storage, density=not args.no_density)
    except StageFailed as exc:
        from cbd_ray.errors import one_line

        print(f"cbd tune: error: {one_line(exc)}", file=sys.stderr)
        return 1
    print(f"best α {res['best_alpha']} -> {res['run_dir'] / 'tune' / 'best_alpha.json'}", flush=True)
    return 0

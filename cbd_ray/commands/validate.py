"""`cbd validate CONFIG [key.sub=value ...]`: check a chain config without running anything.

Prints the chain, the targets with the anchor pair around each, and the stages that would
run; exits 2 with every problem (each naming its key's dotted path) when the config is bad.
Needs no network: shapes come from the config itself.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="chain config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.steps=20")
    parser.add_argument("--storage", default=None, help="also check that this storage root can be written")


def run(args: argparse.Namespace) -> int:
    from cbd_ray.schema import estimate_params, load_config, target_pair
    from cbd_ray.stages.chain import stage_names

    cfg = load_config(args.config, args.overrides)
    if args.storage:
        from cbd_ray.storage import check_writable

        check_writable(args.storage)
    fam, vocab = cfg.family, cfg.source.vocab()
    chain = cfg.chain()
    print(f"{args.config}: ok (run {cfg.run.name}, family {fam})")
    if cfg.bridge is not None:
        t = cfg.bridge.teacher
        print(f"  bridge teacher: {t.model or 'tiny ' + str(t.kind_family)} ({t.kind_family})")
    for name, shape in chain:
        size = f"~{estimate_params(shape, fam, vocab) / 1e6:,.1f}M" if shape is not None and fam else "?"
        label = f"{shape.layers}x{shape.hidden}x{shape.heads}" if shape is not None else "shape from checkpoint"
        print(f"  anchor {name:<16} {label:<18} {size}")
    for t in cfg.grid.targets:
        pair = target_pair(cfg, t)
        between = f"{chain[pair[0]][0]} > {chain[pair[1]][0]}" if pair else "(checked when anchors are known)"
        shape = f"{t.layers}x{t.hidden}x{t.heads}"
        print(f"  target {t.label:<16} {shape:<18} between {between}")
    print(f"  stages: {', '.join(stage_names(cfg))}")
    return 0

"""`cbd validate CONFIG [key.sub=value ...]`: check a config of any kind without running anything.

The kind comes from the file's top-level keys: a ``chain`` key makes a comparison
(``reproduce``) config, ``source``/``anchors``/``run`` a chain config, ``targets``/``params``
a grid, and keys that are all search settings a ``tune`` file. For a chain, prints the chain,
the targets with the anchor pair around each, and the stages that would run; exits 2 with
every problem (each naming its key's dotted path) when the config is bad. Needs no network:
shapes come from the config itself.

``--plan`` (chain configs) also prints the memory plan of every training stage (source SFT,
bridge, every chain step; :mod:`cbd_ray.stages.memory`) for devices of ``--device-memory`` GiB (or
``scaling.device_memory_gib``) and exits 2 with one line per stage that does not fit.
"""
from __future__ import annotations

import argparse
from pathlib import Path

KINDS = ("chain", "reproduce", "grid", "tune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config YAML or a built-in name (see `cbd configs`)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.steps=20")
    parser.add_argument("--storage", default=None, help="also check that this storage root can be written")
    parser.add_argument("--kind", choices=KINDS, default=None, help="the config's kind (default: from its keys)")
    parser.add_argument("--plan", action="store_true",
                        help="also print the memory plan of every training stage (chain configs); "
                             "exit 2 when a stage does not fit")
    parser.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                        help="memory of one device in GiB for --plan (default: scaling.device_memory_gib; "
                             "CPU stages: this node's memory / workers)")


def detect_kind(data: dict, source: str) -> str:
    """The kind of a loaded config mapping, from its top-level keys."""
    from cbd_ray.errors import ConfigError

    keys = set(data)
    if "chain" in keys:
        return "reproduce"
    if keys & {"source", "anchors", "run", "bridge"}:
        return "chain"
    if keys & {"targets", "params"}:
        return "grid"
    from cbd_ray.stages.tune import TuneSettings

    if keys and keys <= set(TuneSettings.model_fields):
        return "tune"
    raise ConfigError(f"{source}: cannot tell the config's kind from its keys {sorted(keys)}; "
                      f"kinds: {', '.join(KINDS)} (pass --kind)")


def _chain(path: Path, overrides: list[str]) -> None:
    from cbd_ray.schema import estimate_params, load_config, target_pair
    from cbd_ray.stages.chain import stage_names

    cfg = load_config(path, overrides)
    fam, vocab = cfg.family, cfg.source.vocab()
    chain = cfg.chain()
    print(f"{path}: ok (chain config, run {cfg.run.name}, family {fam})")
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


def _reproduce(path: Path, overrides: list[str]) -> None:
    from cbd_ray.reproduce import load_reproduce_config

    cfg, chain = load_reproduce_config(path, overrides)
    print(f"{path}: ok (comparison config, run {cfg.run.name}, family {chain.family})")
    print(f"  methods: {', '.join(cfg.methods)}")
    print(f"  chain: {', '.join(name for name, _ in chain.chain())}; "
          f"targets: {', '.join(cfg.targets or [t.label for t in chain.grid.targets])}")


def _grid(path: Path, overrides: list[str]) -> None:
    from cbd_ray.grid import load_grid

    spec = load_grid(path, overrides)
    names = [t.name or f"{t.layers}x{t.hidden}x{t.heads}" for t in spec.targets]
    extra = f" + {spec.params.count} by parameter count" if spec.params is not None else ""
    print(f"{path}: ok (grid, α {spec.alpha}): targets {', '.join(names) or 'none'}{extra}")


def _tune(path: Path, overrides: list[str]) -> None:
    from cbd_ray.config import load
    from cbd_ray.stages.tune import TuneSettings

    s = load(TuneSettings, path, overrides)
    print(f"{path}: ok (tune settings): α {s.alphas}, search {s.search}, densities {s.densities}")


def run(args: argparse.Namespace) -> int:
    from cbd_ray.builtin import resolve_config
    from cbd_ray.config import load_yaml

    path = resolve_config(args.config)
    kind = args.kind or detect_kind(load_yaml(path), str(path))
    if args.storage:
        from cbd_ray.storage import check_writable

        check_writable(args.storage)
    {"chain": _chain, "reproduce": _reproduce, "grid": _grid, "tune": _tune}[kind](path, args.overrides)
    if getattr(args, "plan", False):
        return _plan(path, args.overrides, kind, args.device_memory)
    return 0


def _plan(path: Path, overrides: list[str], kind: str, device_memory: float | None) -> int:
    """Print every training stage's memory plan; 2 (one line per stage on stderr) when a
    stage does not fit, else 0."""
    import sys

    from cbd_ray.errors import ConfigError
    from cbd_ray.memplan import DEFAULT_MARGIN
    from cbd_ray.schema import load_config
    from cbd_ray.stages.memory import plan_chain

    if kind == "reproduce":  # the chain it builds; its baselines' runs are not planned
        from cbd_ray.reproduce import load_reproduce_config

        chain = load_reproduce_config(path, overrides)[1]
        print("the chain of this comparison (its baselines' training runs are not planned):")
    elif kind == "chain":
        chain = load_config(path, overrides)
    else:
        raise ConfigError(f"{path}: --plan plans the training stages of a chain or reproduce config, not a {kind} config")
    plans = plan_chain(chain, device_memory)
    print(f"memory plan (one worker per device, {DEFAULT_MARGIN:.0%} margin):")
    for sp in plans:
        if sp.plan is None:
            print(f"  {sp.line}")
            continue
        print("\n".join("  " + line for line in sp.plan.table(sp.budget).splitlines()))
    bad = [sp for sp in plans if not sp.fits]
    for sp in plans:
        verdict = "fits" if sp.fits else "DOES NOT FIT"
        size = f"{sp.plan.total / 2**30:6.1f} GiB of {sp.budget / 2**30:.1f}" if sp.plan is not None else "not planned"
        micro = f"micro {sp.plan.micro}/{sp.plan.per_worker}" if sp.plan is not None else ""
        print(f"  {sp.stage:<18} {micro:<14} {size}  {verdict if sp.plan is not None else ''}")
    for sp in bad:
        print(sp.line, file=sys.stderr)
    return 2 if bad else 0

"""Ray Tune searches over a chain: the best α per target shape and the chain density.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tune_alpha.py --config configs/demo.yaml [key.sub=value ...] [--storage URI] \
        [--alphas 0,0.25,0.5,0.75,1] [--recovery-steps N] [--densities 2,3,4] [--targets a,b] [--no-density]

Builds or reuses the chain of the config, then writes tune/best_alpha.json ({target: α}) and
the α and density tables and plots in the run directory. Exit 0 ok, 1 a stage failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import sys

from cbd_ray.errors import one_line, run_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="chain config YAML (configs/demo.yaml, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the chain config, e.g. distill.steps=20")
    p.add_argument("--storage", default=None, help="storage root (local path or URI) instead of run.storage")
    p.add_argument("--tune", action="append", default=[], metavar="KEY=VALUE",
                   help="search settings (cbd_ray.stages.tune.TuneSettings), e.g. --tune scheduler=fifo")
    p.add_argument("--alphas", type=lambda s: [float(x) for x in s.split(",")], default=None, help="α grid, a,b,c")
    p.add_argument("--recovery-steps", type=int, default=None, help="recovery training steps per trial")
    p.add_argument("--densities", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--targets", type=lambda s: s.split(","), default=None, help="only these grid targets")
    p.add_argument("--no-density", action="store_true", help="skip the chain-density search")
    a = p.parse_args(argv)
    from cbd_ray.config import apply_overrides, build
    from cbd_ray.pipeline import StageFailed
    from cbd_ray.schema import load_config
    from cbd_ray.stages.tune import TuneSettings, tune_chain

    try:
        cfg = load_config(a.config, a.overrides)
        given = {"alphas": a.alphas, "recovery_steps": a.recovery_steps, "densities": a.densities, "targets": a.targets}
        settings = build(TuneSettings, apply_overrides({k: v for k, v in given.items() if v is not None}, a.tune),
                         source="tune settings")
        res = tune_chain(cfg, settings, storage=a.storage, density=not a.no_density)
    except StageFailed as exc:
        print(f"tune_alpha: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        print(f"tune_alpha: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"tune_alpha: best α {res['best_alpha']} -> {res['run_dir'] / 'tune' / 'best_alpha.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="tune_alpha"))

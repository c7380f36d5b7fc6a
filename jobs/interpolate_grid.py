"""A grid of interpolated models on Ray: a pool of actors, each holding the anchor pair once.

    python jobs/interpolate_grid.py --small DIR --large DIR --grid configs/grid_demo.yaml --out DIR \
        [--actors N] [--alpha A|auto] [--overwrite]
    python jobs/interpolate_grid.py --demo --out runs/demo   # builds two tiny anchors itself

Uses a running Ray (RAY_ADDRESS, as under `ray job submit`, or `ray start`) or starts a local
one. Prints the table at the end; exits 1 when any target failed, 2 on bad input."""

import argparse
import sys
from pathlib import Path

from cbd_ray import grid as G

DEMO_GRID = Path(__file__).resolve().parents[1] / "configs" / "grid_demo.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", help="smaller anchor (a Hugging Face model directory)")
    p.add_argument("--large", help="larger anchor of the same family and vocabulary")
    p.add_argument("--grid", default=None, help=f"grid YAML (default with --demo: {DEMO_GRID.name})")
    p.add_argument("--out", required=True, help="output root: one directory per target, grid.json")
    p.add_argument("--actors", type=int, default=2, help="interpolation actors (default 2)")
    p.add_argument("--actor-cpus", type=float, default=1, help="CPUs per actor (default 1)")
    p.add_argument("--alpha", default=None, help="default α for targets without their own: A in [0,1] or auto")
    p.add_argument("--overwrite", action="store_true", help="replace existing target directories")
    p.add_argument("--demo", action="store_true", help="build tiny anchors under OUT/anchors and run the demo grid")
    a = p.parse_args(argv)
    try:
        if a.demo:
            a.small, a.large = G.demo_anchors(Path(a.out) / "anchors")
            a.out, a.grid = str(Path(a.out) / "grid"), a.grid or str(DEMO_GRID)
        if not (a.small and a.large and a.grid):
            p.error("--small, --large and --grid are required (or --demo)")
        spec = G.load_grid(a.grid)
        alpha = a.alpha if a.alpha in (None, "auto") else float(a.alpha)
        records = G.run_grid(a.small, a.large, spec, a.out, alpha=alpha, num_actors=a.actors,
                             overwrite=a.overwrite, actor_cpus=a.actor_cpus)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"interpolate_grid: error: {exc}", file=sys.stderr)
        return 2
    print(G.format_table(records), flush=True)
    return 1 if G.failures(records) else 0


if __name__ == "__main__":
    sys.exit(main())

"""A grid of interpolated models on Ray: a pool of actors, each holding the anchor pair once.

    python jobs/interpolate_grid.py --small DIR --large DIR --grid configs/grid_demo.yaml --out DIR \
        [--actors N] [--alpha A|auto] [--overwrite]
    python jobs/interpolate_grid.py --demo --out runs/demo   # builds two tiny anchors itself

Uses a running Ray (RAY_ADDRESS, as under `ray job submit`, or `ray start`) or starts a local
one. Prints the table at the end; exits 1 when any target failed, 2 on bad input (one line,
checked before Ray starts: the anchors opened, the grid file, --out new, empty or a grid this
job made, and never inside an anchor)."""

import argparse
import sys
from pathlib import Path

from cbd_ray import grid as G
from cbd_ray.errors import CBDError, run_main

DEMO_GRID = Path(__file__).resolve().parents[1] / "configs" / "grid_demo.yaml"
#: the marker this job leaves in --out: a later run may write there again (grid.json, targets)
GRID_MARKER = "cbd.json"


def parse_alpha(text: str | None) -> float | str | None:
    """--alpha: None, 'auto' or a number in [0, 1]; anything else names the flag."""
    if text is None or text.strip() == "auto":
        return None if text is None else "auto"
    try:
        value = float(text)
    except ValueError:
        raise CBDError(f"--alpha {text!r}: expected a number in [0, 1] or 'auto'") from None
    if not 0.0 <= value <= 1.0:
        raise CBDError(f"--alpha {text!r}: expected a number in [0, 1] or 'auto'")
    return value


def claim_out(out: Path, inputs: tuple, kind: str) -> None:
    """The output rule (storage.guard_output) for a grid root, then our marker in it: a
    non-empty --out this job did not make (the user's grid.json, a model) is refused."""
    from cbd_ray.storage import atomic_write_json, guard_output

    state = guard_output(out, inputs=inputs, marker=(GRID_MARKER,), reuse=True)
    if state != "ours":
        atomic_write_json(out / GRID_MARKER, {"format": f"cbd-ray {kind}", "inputs": [str(i) for i in inputs]})


def check_inputs(a: argparse.Namespace, p: argparse.ArgumentParser) -> tuple:
    """Everything checkable before Ray starts; returns (grid spec, α)."""
    from cbd_ray.checks import check_model_dir
    from cbd_ray.storage import guard_output

    alpha = parse_alpha(a.alpha)
    if a.demo:
        root = Path(a.out)
        guard_output(root, marker=(GRID_MARKER,), reuse=True)  # before the demo anchors are written
        claim_out(root, (), "interpolation demo")
        a.small, a.large = G.demo_anchors(root / "anchors")
        a.out, a.grid = str(root / "grid"), a.grid or str(DEMO_GRID)
    if not (a.small and a.large and a.grid):
        p.error("--small, --large and --grid are required (or --demo)")
    spec = G.load_grid(a.grid)
    check_model_dir(a.small, "small anchor", tokenizer=False)
    check_model_dir(a.large, "large anchor", tokenizer=False)
    guard_output(a.out, inputs={"small anchor": a.small, "large anchor": a.large, "--grid file": a.grid},
                 marker=(GRID_MARKER,), reuse=True)
    return spec, alpha


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", help="smaller anchor (a Hugging Face model directory)")
    p.add_argument("--large", help="larger anchor of the same family and vocabulary")
    p.add_argument("--grid", default=None, help=f"grid YAML (default with --demo: {DEMO_GRID.name})")
    p.add_argument("--out", required=True, help="output root: one directory per target, grid.json")
    p.add_argument("--actors", type=int, default=2, help="interpolation actors (default 2)")
    p.add_argument("--actor-cpus", type=float, default=1, help="CPUs per actor (default 1)")
    p.add_argument("--alpha", default=None, help="default α for targets without their own: A in [0,1] or auto")
    p.add_argument("--overwrite", action="store_true", help="replace existing target directories made by cbd-ray")
    p.add_argument("--demo", action="store_true", help="build tiny anchors under OUT/anchors and run the demo grid")
    a = p.parse_args(argv)
    spec, alpha = check_inputs(a, p)
    claimed: list[bool] = []

    def say(line: str) -> None:
        # run_grid's first line comes after it validated every target and before any is made:
        # the marker goes in then, so a refused grid leaves --out as it was
        if not claimed:
            claim_out(Path(a.out), (a.small, a.large), "interpolation grid")
            claimed.append(True)
        print(line, flush=True)

    records = G.run_grid(a.small, a.large, spec, a.out, alpha=alpha, num_actors=a.actors,
                         overwrite=a.overwrite, actor_cpus=a.actor_cpus, log=say)
    print(G.format_table(records), flush=True)
    return 1 if G.failures(records) else 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="interpolate_grid"))

"""`cbd grid`: a grid of interpolated models on Ray, a pool of actors each holding the anchor pair once.

    cbd grid --small DIR --large DIR --grid grid_demo --out DIR [--actors N] [--alpha A|auto]
    cbd grid --demo --out runs/demo          # builds two tiny anchors itself

Uses a running Ray (RAY_ADDRESS, as under `ray job submit`, or `ray start`) or starts a local
one. Prints the table at the end; exits 1 when any target failed, 2 on bad input (one line,
checked before Ray starts: the anchors opened, the grid file, --out new, empty or a grid this
command made, and never inside an anchor).
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEMO_GRID = "grid_demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small", help="smaller anchor (a Hugging Face model directory)")
    parser.add_argument("--large", help="larger anchor of the same family and vocabulary")
    parser.add_argument("--grid", default=None,
                        help=f"grid YAML or a built-in name (default with --demo: {DEMO_GRID})")
    parser.add_argument("--out", required=True, help="output root: one directory per target, grid.json")
    parser.add_argument("--actors", type=int, default=2, help="interpolation actors (default 2)")
    parser.add_argument("--actor-cpus", type=float, default=1, help="CPUs per actor (default 1)")
    parser.add_argument("--alpha", default=None, help="default α for targets without their own: A in [0,1] or auto")
    parser.add_argument("--overwrite", action="store_true", help="replace existing target directories made by cbd-ray")
    parser.add_argument("--demo", action="store_true", help="build tiny anchors under OUT/anchors and run the demo grid")


#: the marker this command leaves in --out: a later run may write there again (grid.json, targets)
GRID_MARKER = "cbd.json"


def parse_alpha(text: str | None) -> float | str | None:
    """--alpha: None, 'auto' or a number in [0, 1]; anything else names the flag."""
    from cbd_ray.errors import CBDError

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
    non-empty --out this command did not make (the user's grid.json, a model) is refused."""
    from cbd_ray.storage import atomic_write_json, guard_output

    state = guard_output(out, inputs=inputs, marker=(GRID_MARKER,), reuse=True)
    if state != "ours":
        atomic_write_json(out / GRID_MARKER, {"format": f"cbd-ray {kind}", "inputs": [str(i) for i in inputs]})


def check_inputs(a: argparse.Namespace) -> tuple:
    """Everything checkable before Ray starts (the anchors opened, the grid file, the output
    rule); with --demo the tiny anchors are made first. Returns (grid spec, α)."""
    from cbd_ray import grid as G
    from cbd_ray.builtin import resolve_config
    from cbd_ray.checks import check_model_dir
    from cbd_ray.errors import CBDError
    from cbd_ray.storage import guard_output

    alpha = parse_alpha(a.alpha)
    if a.demo:
        root = Path(a.out)
        guard_output(root, marker=(GRID_MARKER,), reuse=True)  # before the demo anchors are written
        claim_out(root, (), "interpolation demo")
        a.small, a.large = G.demo_anchors(root / "anchors")
        a.out, a.grid = str(root / "grid"), a.grid or DEMO_GRID
    if not (a.small and a.large and a.grid):
        raise CBDError("--small, --large and --grid are required (or --demo)")
    a.grid = str(resolve_config(a.grid))
    spec = G.load_grid(a.grid)
    check_model_dir(a.small, "small anchor", tokenizer=False)
    check_model_dir(a.large, "large anchor", tokenizer=False)
    guard_output(a.out, inputs={"small anchor": a.small, "large anchor": a.large, "--grid file": a.grid},
                 marker=(GRID_MARKER,), reuse=True)
    return spec, alpha


def run(args: argparse.Namespace) -> int:
    from cbd_ray import grid as G

    spec, alpha = check_inputs(args)
    claimed: list[bool] = []

    def say(line: str) -> None:
        # run_grid's first line comes after it validated every target and before any is made:
        # the marker goes in then, so a refused grid leaves --out as it was
        if not claimed:
            claim_out(Path(args.out), (args.small, args.large), "interpolation grid")
            claimed.append(True)
        print(line, flush=True)

    records = G.run_grid(args.small, args.large, spec, args.out, alpha=alpha, num_actors=args.actors,
                         overwrite=args.overwrite, actor_cpus=args.actor_cpus, log=say)
    print(G.format_table(records), flush=True)
    if spec.export:
        from cbd_ray.export import export_targets, exports_table

        done = [{"name": r["name"], "path": r["path"]} for r in records if r.get("status", "ok") == "ok"]
        made = export_targets(done, Path(args.out) / "exports", list(spec.export))
        print(exports_table(made), flush=True)
    return 1 if G.failures(records) else 0

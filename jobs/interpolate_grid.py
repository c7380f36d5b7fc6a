"""A grid of interpolated models on Ray: a pool of actors, each holding the anchor pair once (`cbd grid` for `ray job submit`).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/interpolate_grid.py [ARGS]

takes the arguments of `cbd grid` (see `cbd grid --help`); the work is done by
cbd_ray.commands.grid, so the installed command and this script behave the same.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's cbd_ray under --working-dir

from cbd_ray.cli import job_main  # noqa: E402
from cbd_ray.commands.grid import claim_out, parse_alpha  # noqa: E402,F401 (the job's helpers, as before)


def main(argv: list[str] | None = None, **hooks) -> int:
    return job_main("grid", argv, **hooks)


if __name__ == "__main__":
    sys.exit(main())

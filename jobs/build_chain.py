"""Build a chain of anchors, interpolate the target grid, evaluate, report: the main job (`cbd build-chain` for `ray job submit`).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/build_chain.py [ARGS]

takes the arguments of `cbd build-chain` (see `cbd build-chain --help`); the work is done by
cbd_ray.commands.build_chain, so the installed command and this script behave the same.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's cbd_ray under --working-dir

from cbd_ray.cli import job_main  # noqa: E402


def main(argv: list[str] | None = None, **hooks) -> int:
    return job_main("build-chain", argv, **hooks)


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate many models on Ray, one model per Ray task, a table per model in OUT (`cbd evaluate-many` for `ray job submit`).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/evaluate.py [ARGS]

takes the arguments of `cbd evaluate-many` (see `cbd evaluate-many --help`); the work is done by
cbd_ray.commands.evaluate_many, so the installed command and this script behave the same.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's cbd_ray under --working-dir

from cbd_ray.cli import job_main  # noqa: E402


def main(argv: list[str] | None = None, **hooks) -> int:
    return job_main("evaluate-many", argv, **hooks)


if __name__ == "__main__":
    sys.exit(main())

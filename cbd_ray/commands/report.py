"""`cbd report RUN_DIR`: regenerate report.md (and its plots) from a run directory alone."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a chain run directory (holds manifest.json)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cbd_ray.manifest import Manifest
    from cbd_ray.stages.summary import cost_rows, format_cost_table, write_run_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no manifest.json: not a chain run directory")
    path = write_run_report(run_dir)
    print(format_cost_table(cost_rows(Manifest.load(run_dir))))
    print(f"report: {path}")
    return 0

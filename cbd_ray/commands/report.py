"""`cbd report RUN_DIR`: regenerate report.md (and its plots) from a run directory alone.

Everything the report reads is checked first (manifest.json an object, the evaluation and
target tables valid JSON, each error naming file:line); a run without ``evaluation/`` is
reported with a note on stderr saying the held-out loss section is left out and why.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a chain run directory (holds manifest.json)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cbd_ray.data import read_json_file
    from cbd_ray.errors import CBDError
    from cbd_ray.manifest import Manifest
    from cbd_ray.stages.summary import cost_rows, format_cost_table, write_run_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist (or is not a directory)")
    if not (run_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no manifest.json: not a chain run directory")
    manifest = Manifest.load(run_dir)
    if not manifest.stages:
        raise CBDError(f"{run_dir / 'manifest.json'} records no stages: nothing to report")
    for table, kind in (("evaluation/evaluation.json", list), ("targets/targets.json", list)):
        f = run_dir / table
        if f.is_file() and not isinstance(read_json_file(f), kind):
            raise CBDError(f"{f}: expected a JSON list of records")
    if not (run_dir / "evaluation" / "evaluation.json").is_file():
        print(f"cbd report: note: {run_dir / 'evaluation'} has no evaluation.json (the evaluate stage has not run "
              "or was removed): the report has no held-out loss section", file=sys.stderr, flush=True)
    path = write_run_report(run_dir, manifest)
    print(format_cost_table(cost_rows(manifest)))
    print(f"report: {path}")
    return 0

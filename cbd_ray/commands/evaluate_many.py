"""`cbd evaluate-many`: evaluate many models on Ray, one model per Ray task, a table per model in OUT.

Uses a running Ray (RAY_ADDRESS, as under `ray job submit`) or starts a local one. Prints the
summary table; exits 2 on bad input.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", required=True, help="comma-separated DIR or NAME=DIR (name: the folder name)")
    parser.add_argument("--tasks", required=True, help="comma-separated task names (cbd_ray.tasks.TASKS)")
    parser.add_argument("--out", required=True, help="directory for <model>.json/.md and summary.json/.md")
    parser.add_argument("--data-dir", default=None, help="folder laid out like shared/data (default: the Hub)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"])
    parser.add_argument("--cpus", type=float, default=1, help="CPUs per Ray task (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace tables made with other settings")


def run(args: argparse.Namespace) -> int:
    from cbd_ray.report import markdown_table
    from cbd_ray.stages.evaluate import evaluate_many, summary_rows

    from cbd_ray.checks import check_model_dir

    items = [m.split("=", 1) if "=" in m else (Path(m).name, m) for m in args.models.split(",") if m]
    for name, path in items:  # cheap checks on the driver, before any Ray task starts
        check_model_dir(path, f"model {name!r}")
    rows = evaluate_many(dict(items), args.tasks, args.out, data_dir=args.data_dir, limit=args.limit,
                         shots=args.shots, batch_size=args.batch_size, device=args.device, num_cpus=args.cpus,
                         overwrite=args.overwrite)
    per_model: dict[str, list] = {}
    for r in rows:
        per_model.setdefault(r["model"], []).append(r)
    print(markdown_table(summary_rows(per_model)), flush=True)
    return 0

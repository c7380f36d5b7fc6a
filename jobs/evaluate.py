"""Evaluate many models on Ray, one model per Ray task, a table per model in OUT.

    ray job submit -- python jobs/evaluate.py --models DIR[,NAME=DIR...] --tasks boolq,mmlu --out DIR \
        [--data-dir DIR] [--limit N] [--shots K] [--batch-size N] [--device auto] [--overwrite]

Uses a running Ray (RAY_ADDRESS, as under `ray job submit`) or starts a local one. Prints the
summary table; exits 2 on bad input."""

import argparse
import sys
from pathlib import Path

from cbd_ray.errors import one_line, run_main
from cbd_ray.report import markdown_table
from cbd_ray.stages.evaluate import evaluate_many, summary_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True, help="comma-separated DIR or NAME=DIR (name: the folder name)")
    p.add_argument("--tasks", required=True, help="comma-separated task names (cbd_ray.tasks.TASKS)")
    p.add_argument("--out", required=True, help="directory for <model>.json/.md and summary.json/.md")
    p.add_argument("--data-dir", default=None, help="folder laid out like shared/data (default: the Hub)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"])
    p.add_argument("--cpus", type=float, default=1, help="CPUs per Ray task (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace tables made with other settings")
    a = p.parse_args(argv)
    items = [m.split("=", 1) if "=" in m else (Path(m).name, m) for m in a.models.split(",") if m]
    try:
        from cbd_ray.checks import check_model_dir

        for name, path in items:  # cheap checks on the driver, before any Ray task starts
            check_model_dir(path, f"model {name!r}")
        rows = evaluate_many(dict(items), a.tasks, a.out, data_dir=a.data_dir, limit=a.limit, shots=a.shots,
                             batch_size=a.batch_size, device=a.device, num_cpus=a.cpus, overwrite=a.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"evaluate: error: {one_line(exc)}", file=sys.stderr)
        return 2
    per_model: dict[str, list] = {}
    for r in rows:
        per_model.setdefault(r["model"], []).append(r)
    print(markdown_table(summary_rows(per_model)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="evaluate"))

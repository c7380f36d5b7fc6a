"""The paper's comparisons: CBD against Rand, Single, Direct KD and the Learngenes.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/reproduce.py --config configs/reproduce_gpt2.yaml [key.sub=value ...] [--storage URI]
    python jobs/reproduce.py --config configs/reproduce_tiny.yaml     # a local Ray, a few minutes on a CPU

Builds or reuses the chain, searches α, initialises every method at every target shape,
fine-tunes each with the same budget, scores them the same way and writes report.md (a row
per method and target, loss curves, steps to the same loss, α sweep) in the run directory.
Exit 0 on success, 1 when a chain stage failed, 2 on bad input.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from cbd_ray.errors import one_line, run_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="comparison config YAML (configs/reproduce_tiny.yaml, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. finetune.steps=20 methods=[cbd,rand]")
    p.add_argument("--storage", default=None, help="storage root (local path or URI) instead of run.storage")
    a = p.parse_args(argv)
    from cbd_ray.pipeline import StageFailed
    from cbd_ray.reproduce import load_reproduce_config, run_reproduce

    command = "python jobs/reproduce.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    try:
        cfg, chain = load_reproduce_config(a.config, a.overrides)
        res = run_reproduce(cfg, chain, storage=a.storage, command=command)
    except StageFailed as exc:
        print(f"reproduce: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        print(f"reproduce: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"reproduce: {len(res['rows'])} rows -> {res['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="reproduce"))

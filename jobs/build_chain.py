"""Build a chain of anchors, interpolate the target grid, evaluate, report: the main job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/build_chain.py --config configs/demo.yaml [key.sub=value ...] \
        [--storage URI] [--from-stage STAGE] [--force]
    python jobs/build_chain.py --config configs/demo.yaml     # a local Ray

Reruns skip intact stages and resume cut-short ones. Exit 0 when every stage is done,
1 when a stage failed (the manifest says which and why), 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from cbd_ray.errors import one_line, run_main


def main(argv: list[str] | None = None, after_stage: Callable[[str, dict[str, Any]], None] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="chain config YAML (configs/demo.yaml, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.steps=20 grid.actors=1")
    p.add_argument("--storage", default=None, help="storage root (local path or URI) instead of run.storage")
    p.add_argument("--from-stage", default=None, help="redo this stage and every later one")
    p.add_argument("--force", action="store_true", help="redo every stage (from --from-stage if given); "
                   "also takes over a run directory of another config")
    a = p.parse_args(argv)
    from cbd_ray.pipeline import StageFailed
    from cbd_ray.schema import load_config
    from cbd_ray.stages.chain import resolve_run_dir, run_chain

    try:
        cfg = load_config(a.config, a.overrides)
        run_chain(cfg, storage=a.storage, from_stage=a.from_stage, force=a.force, after_stage=after_stage)
    except StageFailed as exc:
        from cbd_ray.storage import redact, uri_join

        record = redact(uri_join(resolve_run_dir(cfg, a.storage)[0], "manifest.json"))
        print(f"build_chain: error: {one_line(exc)} (the record: {record})", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        print(f"build_chain: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="build_chain"))

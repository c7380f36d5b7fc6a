"""The chain's ``export`` stage (only when ``grid.export`` lists formats): every grid target
in ONNX and/or GGUF under ``<run>/exports/<target>/``, listed in ``exports.json`` and the
run's report with sizes and checks. One Ray task on one worker (CPU work); with a run
directory in object storage the worker fetches the targets by reference and ships its output
back like every producing stage."""
from __future__ import annotations

import json
from typing import Any, Callable

from cbd_ray.pipeline import StageContext


def export_stage(cfg: Any, produce: Callable[..., Any]) -> Callable[[StageContext], dict[str, Any]]:
    """``produce``: cbd_ray.stages.worker.produce (runs ``fn(out, device, *args)`` as a Ray task)."""

    def fn(ctx: StageContext) -> dict[str, Any]:
        from cbd_ray.export import export_task

        targets = json.loads((ctx.inputs["grid"] / "targets.json").read_text())
        refs = [{"name": t["name"], "path": ctx.ref("grid", sub=t["path"])} for t in targets]
        records = produce(cfg, ctx, export_task, refs, list(cfg.grid.export))
        for r in records:
            ctx.log(f"export: {r['model']} {r['format']} {r['bytes']:,} bytes")
        return {"files": len(records), "bytes": sum(r["bytes"] for r in records), "student_tokens": 0,
                "teacher_tokens": 0}

    return fn

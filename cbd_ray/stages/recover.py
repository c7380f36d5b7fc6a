"""``grid.recover``: a short distillation of each blended target from its larger anchor.

A blended target starts near its anchors; recovery spends a few steps of the chain's own
objective (the shared ``distill`` section, overridden by ``grid.recover``) with the target's
larger anchor as teacher, so the target is pulled towards a model that exists already. The
chain's source is never the teacher: CBD does not call the large model again, so a target
whose larger model is the source stays as blended, and its record says why. The anchors'
teacher tokens are counted in the grid stage's metrics (the report's cost table).
"""
from __future__ import annotations

import json
import shutil
from typing import Any

#: why a target is not recovered
FROM_SOURCE = "its larger model is the chain's source, which CBD does not call again"


def recover_settings(cfg: Any) -> dict[str, Any]:
    """The distillation settings of recovery: scaling, the shared distill section, grid.recover."""
    return {**cfg.scaling_distill(), **cfg.distill, **(cfg.grid.recover or {})}


def recover_target(ctx: Any, record: dict[str, Any], teacher_ref: Any, settings: dict[str, Any],
                   max_failures: int = 0) -> dict[str, Any]:
    """Distil the blended target of ``record`` (a directory in the grid stage's output) from
    ``teacher_ref`` and put the result in its place; returns what to add to the record."""
    from cbd_ray.config import build
    from cbd_ray.stages.data import run_corpus
    from cbd_ray.train import DistillConfig, run_distill

    dcfg = build(DistillConfig, settings, source="grid.recover")
    target = ctx.out / record["path"]
    blended = ctx.work / "recover" / record["name"] / "blended"
    if not (blended / "config.json").is_file():  # a rerun after a cut keeps the blend it started from
        shutil.rmtree(blended, ignore_errors=True)
        shutil.copytree(target, blended)
    out = ctx.work / "recover" / record["name"] / "out"
    ctx.log(f"grid: recovering {record['name']} from {record['large']} ({dcfg.objective}, {dcfg.steps} steps)")
    student = ctx.publish(blended, f"recover_{record['name']}")
    corpus = run_corpus(ctx, dcfg, student)  # the chain's own, which its steps built already
    m = run_distill(teacher_ref, student,
                    str(ctx.inputs["data"] / "train.jsonl"), str(out), dcfg,
                    eval_data=ctx.ref("data", file="eval.jsonl"),
                    storage_path=ctx.uri("work", ctx.name, "recover", record["name"], "ray_train"),
                    max_failures=max_failures, name=f"recover_{record['name']}", log=ctx.log, lm_data=corpus)
    kept = [f for f in ("baseline.json", "interpolation.json") if (target / f).is_file()]
    for f in kept:
        shutil.copy2(target / f, out / f)
    shutil.rmtree(target)
    shutil.copytree(out, target)
    metrics = json.loads(json.dumps(dict(m or {}), default=str))
    return {"recovered": {"teacher": record["large"], "steps": dcfg.steps, "objective": dcfg.objective,
                          "teacher_tokens": int(metrics.get("teacher_tokens") or 0),
                          "student_tokens": int(metrics.get("student_tokens") or 0)}}


def recover_targets(ctx: Any, cfg: Any, records: list[dict[str, Any]], teachers: dict[str, Any]) -> dict[str, int]:
    """Recover every blended target whose larger model is an anchor (``teachers``: anchor
    name -> model reference); the others get ``recover_skipped``. Returns the tokens spent."""
    settings = recover_settings(cfg)
    spent = {"teacher_tokens": 0, "student_tokens": 0}
    for r in records:
        if r["large"] not in teachers:
            r["recover_skipped"] = FROM_SOURCE
            ctx.log(f"grid: {r['name']} stays as blended: {FROM_SOURCE}")
            continue
        r.update(recover_target(ctx, r, teachers[r["large"]], settings, cfg.scaling.max_failures))
        for k in spent:
            spent[k] += r["recovered"][k]
    return spent

"""The distillation stage: one chain step as ``run(cfg, ctx) -> metrics``.

A thin wrapper over :func:`cbd_ray.train.run_distill` for pipelines: ``cfg`` says which
models and data, ``ctx`` (a :class:`cbd_ray.pipeline.StageContext` or any object with
``out`` and ``work``) where to write the student and keep checkpoints, so a rerun after a
crash resumes from the last checkpoint under ``ctx.work``.
"""
from __future__ import annotations

from typing import Any

from cbd_ray.config import Strict
from cbd_ray.train import DistillConfig


class DistillStage(Strict):
    """A distillation step: the teacher, the student to start from, the data, the settings."""

    teacher: str
    student: str
    data: str
    eval_data: str | None = None
    distill: DistillConfig = DistillConfig()
    max_failures: int = 1


def run(cfg: DistillStage | dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Distil ``cfg.teacher`` into ``cfg.student`` on Ray Train; the student is written to
    ``ctx.out`` and Ray Train's checkpoints are kept under ``ctx.work``. Returns the run's
    metrics (loss parts, eval metrics, student and teacher tokens, the chosen step)."""
    from pathlib import Path

    from cbd_ray.train import run_distill

    if isinstance(cfg, dict):
        cfg = DistillStage(**cfg)
    return run_distill(cfg.teacher, cfg.student, cfg.data, ctx.out, cfg.distill, eval_data=cfg.eval_data,
                       storage_path=str(Path(ctx.work) / "ray_train"), max_failures=cfg.max_failures)

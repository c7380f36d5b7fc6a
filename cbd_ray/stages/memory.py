"""The memory plan of a chain config: every training stage, planned before any work.

:func:`plan_chain` lists the training stages a chain config makes (the same ones, in the same
order, as :func:`cbd_ray.stages.chain.build_stages`) and plans each with
:mod:`cbd_ray.memplan` at its configured micro-batch (``auto``: the largest that fits), so
``cbd validate --plan`` can refuse a config offline, naming the stage and what to change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from cbd_ray.errors import CBDError, ConfigError
from cbd_ray.memplan import DEFAULT_MARGIN, MemoryPlan, auto_micro_batch, device_budget, plan_distill, refusal
from cbd_ray.train import DistillConfig


class TrainingStage(NamedTuple):
    """A training stage of a chain as the plan sees it: its settings (DistillConfig fields),
    the teacher's and student's shapes (None: unknown or no teacher), and whether its step
    runs under bf16 autocast on an accelerator (a pretraining loop runs float32 throughout)."""

    name: str
    settings: dict[str, Any]
    teacher: dict | None
    student: dict | None
    autocast: bool = True


@dataclass
class StagePlan:
    """The plan of one training stage of a chain: ``plan`` (None when a shape is unknown),
    whether it ``fits``, and ``line``: why not (one line), or a note."""

    stage: str
    plan: MemoryPlan | None
    fits: bool
    line: str = ""
    budget: float = 0.0   # bytes one worker may use


def _chain_shape(shape: Any, family: str | None, vocab: int | None, positions: int | None = None) -> dict | None:
    """A shape mapping for :func:`model_shape` from a config's ShapeSpec (None if unknown)."""
    if shape is None or family is None:
        return None
    d = {**shape.model_dump(), "family": family}
    d["vocab_size"] = d.get("vocab_size") or vocab
    if positions and family == "gpt2":
        d["positions"] = positions
    return d


def _model_shape_of(spec: Any) -> dict | None:
    """The shape mapping of a chain config's ModelSpec (a tiny model or a checkpoint)."""
    pos = spec.tiny.max_positions if spec.tiny is not None else None
    return _chain_shape(spec.kind_shape, spec.kind_family, spec.vocab(), pos)


def _pretrain_settings(cfg: Any, anchor: Any, base: dict[str, Any]) -> dict[str, Any]:
    """An ``init: pretrain`` anchor's pretraining (``cbd_ray.stages.models.pretrain_lm``) as the
    settings of the step it equals in memory: the LM loss on its whole batch at once, AdamW,
    one worker, no DeepSpeed, no checkpointing."""
    p = cfg.anchor_pretrain(anchor)
    return {**base, "objective": "sft", "batch_size": p.batch_size, "micro_batch": p.batch_size,
            "max_len": p.seq_len, "workers": 1, "deepspeed": None, "gradient_checkpointing": False}


def chain_training_stages(cfg: Any) -> list[TrainingStage]:
    """Every training stage of a chain config, as ``cbd_ray.stages.chain.build_stages`` builds them: the bridge
    teacher's SFT, the source's SFT, the bridge (SeqKD on pre-generated answers, no teacher
    run), each anchor's pretraining (``<name>_pretrain``, with ``init: pretrain``), SFT
    (``<name>_sft``, when set) and chain step (the previous chain model teaches the anchor)."""
    base = {**cfg.scaling_distill(), **cfg.distill}
    vocab = cfg.source.vocab()
    out: list[TrainingStage] = []
    if cfg.bridge is not None and cfg.bridge.teacher.sft is not None and cfg.bridge.teacher.sft.enabled:
        out.append(TrainingStage("teacher_sft", {**base, "objective": "sft", **cfg.bridge.teacher.sft.distill}, None,
                    _model_shape_of(cfg.bridge.teacher)))
    source = _model_shape_of(cfg.source)
    if cfg.source.sft is not None and cfg.source.sft.enabled:
        out.append(TrainingStage("source_sft", {**base, "objective": "sft", **cfg.source.sft.distill}, None, source))
    if cfg.bridge is not None:
        out.append(TrainingStage("bridge", {**base, **cfg.bridge.distill, "objective": "seqkd"}, None, source))
    prev = source
    for i, a in enumerate(cfg.anchors):
        shape = _chain_shape(a.shape, cfg.family, vocab)
        if a.init == "pretrain":  # trained apart first: one worker, float32
            out.append(TrainingStage(f"{a.name}_pretrain", _pretrain_settings(cfg, a, base), None, shape, False))
        if a.sft is not None and a.sft.enabled:  # the anchor's start, SFT'd before its chain step
            out.append(TrainingStage(f"{a.name}_sft", {**base, "objective": "sft", **a.sft.distill}, None, shape))
        out.append(TrainingStage(f"chain_{i + 1}", cfg.step_distill(i), prev, shape))
        prev = shape
    return out


def plan_chain(cfg: Any, device_memory_gib: float | None = None, margin: float = DEFAULT_MARGIN) -> list[StagePlan]:
    """The plan of every training stage of a chain config (:func:`chain_training_stages`),
    each at its configured micro-batch ("auto": the largest that fits). ``device_memory_gib``
    overrides the settings' own; without either, CPU stages share this node's memory and an
    accelerator stage is a ConfigError."""
    out: list[StagePlan] = []
    for stage, settings, teacher, student, autocast in chain_training_stages(cfg):
        if device_memory_gib:
            settings = {**settings, "device_memory_gib": device_memory_gib}
        d = DistillConfig.model_validate(settings)
        if student is None or (d.needs_teacher and teacher is None):
            out.append(StagePlan(stage, None, True, f"{stage}: not planned (a model's shape is not in the config; "
                                                    "give its `shape:` to plan it offline)"))
            continue
        if not d.device_memory_gib and d.device in ("cuda", "npu"):
            raise ConfigError(f"{stage}: planning for {d.device} needs the memory of one device: pass "
                              "--device-memory GiB or set scaling.device_memory_gib")
        device, budget, _ = device_budget(d)
        real = device
        if not autocast:  # planned as float32 throughout, as on a CPU, within the device's budget
            device = "cpu"
        try:
            micro = auto_micro_batch(d, teacher, student, d.workers, device, budget, stage=stage, margin=margin) \
                if d.micro_batch == "auto" else d.micro
        except CBDError as exc:
            plan = plan_distill(d, teacher, student, d.workers, device, stage=stage, micro=1)
            out.append(StagePlan(stage, plan, False, str(exc), budget))
            continue
        plan = plan_distill(d, teacher, student, d.workers, device, stage=stage, micro=micro)
        if real != device:
            plan.device = f"{real} (float32, no autocast)"
        ok = plan.fits(budget, margin)
        out.append(StagePlan(stage, plan, ok, "" if ok else refusal(plan, d, budget, margin), budget))
    return out


__all__ = ["StagePlan", "TrainingStage", "chain_training_stages", "plan_chain"]

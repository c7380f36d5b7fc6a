"""The bridge's pseudo-labels: a heterogeneous teacher answers the instruction prompts.

The prompts go through a Ray Data ``map_batches`` actor pool: each actor loads the teacher
once (one model copy per GPU or NPU, or per CPU slot), samples answers for a batch of prompts,
and counts the tokens the teacher processed (prompt + answer). What each actor asks Ray for is
decided on the driver from the cluster's resources (:func:`actor_request`); the torch device
is resolved on the actor itself (an NPU actor's card is always ``npu:0``). The answers are
written as a dataset (Parquet, by Ray Data) to storage and as one JSONL of the Dolly schema
(instruction, context, response) that the bridge model is then fine-tuned on (SeqKD).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cbd_ray.console import quiet_ray_data
from cbd_ray.data import render_prompt


def actor_request(device: str, cluster: dict[str, float], per_actor: float = 0) -> tuple[str, dict[str, Any]]:
    """``(kind, Ray options)`` of one teacher actor: the torch device kind it loads the teacher
    on (``cuda``, ``npu`` or ``cpu``) and the accelerator part of its Ray request.

    ``device`` is the requested kind (``auto``/``cuda``/``npu``/``cpu``) and ``cluster`` the
    driver's ``ray.cluster_resources()``; :func:`cbd_ray.devices.plan` picks the kind (auto:
    GPU, then NPU, then CPU; ``cuda``/``npu`` on a cluster without them is refused here, before
    any actor starts). ``per_actor``: accelerators per actor (a fraction shares a card; 0
    means one). E.g. ``("npu", {"resources": {"NPU": 1}})`` on an Ascend cluster: Ray then sets
    the actor's ``ASCEND_RT_VISIBLE_DEVICES``, as it sets ``CUDA_VISIBLE_DEVICES`` for GPUs."""
    from cbd_ray import devices

    spec, _ = devices.plan(device, cluster)
    n = per_actor or 1
    if spec.kind == "cuda":
        return "cuda", {"num_gpus": n}
    if spec.kind == "npu":
        return "npu", {"resources": {"NPU": n}}
    return "cpu", {}


class TeacherAnswerer:
    """A Ray Data actor: loads the teacher once, answers batches of prompts.

    A batch is ``{"prompt": array[str], ...}``; the result adds ``response`` (array[str])
    and ``teacher_tokens`` (array[int]: prompt + answer tokens the teacher processed)."""

    def __init__(self, model_dir: str, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                 device: str, seed: int, batch_size: int) -> None:
        import torch

        from cbd_ray import devices
        from cbd_ray.evaluate import load_model

        if device == "npu":  # on this actor: imports torch-npu and selects the card Ray gave it
            devices.worker_device("npu")
        torch.manual_seed(seed)
        from cbd_ray.storage import materialize

        self.model, self.tok = load_model(str(materialize(model_dir)), device)  # a path or a storage reference
        self.tok.padding_side = "left"  # decoder-only generation pads on the left
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        self.batch_size = batch_size

    def _generate(self, prompts: list[str]) -> list[str]:
        from cbd_ray.generate import generate_texts

        greedy = self.kw["temperature"] == 0
        return list(generate_texts(self.model, self.tok, prompts, self.kw["max_new_tokens"], self.batch_size,
                                   temperature=1.0 if greedy else self.kw["temperature"], top_p=self.kw["top_p"],
                                   top_k=self.kw["top_k"], do_sample=not greedy))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        answers = self._generate(prompts)
        counts = [len(self.tok(p)["input_ids"]) + len(self.tok(a)["input_ids"]) for p, a in zip(prompts, answers)]
        return {**batch, "response": np.array(answers, dtype=object), "teacher_tokens": np.array(counts, dtype=np.int64)}


def generate_answers(teacher_dir: str, records: list[dict[str, Any]], out_dir: str | os.PathLike,
                     max_new_tokens: int = 128, batch_size: int = 8, temperature: float = 1.0,
                     top_p: float = 1.0, top_k: int = 0, actors: int = 1, gpus_per_actor: float = 0,
                     cpus_per_actor: float = 1, device: str = "auto", seed: int = 0,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Answer every record's prompt with the teacher in a Ray Data actor pool.

    ``device`` (auto/cuda/npu/cpu) and ``gpus_per_actor`` (accelerators per actor, GPUs or
    NPUs; 0: one) become each actor's request by :func:`actor_request`. Writes
    ``out_dir/answers.parquet/`` (Ray Data) and ``out_dir/answers.jsonl`` (instruction,
    context, response: the teacher's answer; empty answers dropped). Returns prompts, kept
    answers and teacher tokens."""
    import ray

    say = log or (lambda s: print(s, flush=True))
    if not records:
        raise ValueError("the bridge has no instruction prompts to answer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": r["instruction"], "context": r.get("context", "") or "",
             "prompt": render_prompt(r["instruction"], r.get("context", "") or "")} for r in records]
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init()  # what Ray Data would do on first use; the plan needs the cluster's resources
    kind, accel = actor_request(device, ray.cluster_resources(), gpus_per_actor)
    if kind == "cpu" and gpus_per_actor:
        say(f"bridge: gpus_per_actor={gpus_per_actor} ignored: the teacher runs on CPU (device={device})")
    say(f"bridge: teacher answers {len(rows)} prompts on {actors} actor(s), device {kind}"
        + (f", each asking Ray for {accel}" if accel else ""))
    quiet_ray_data()  # Ray Data's progress lines off a quiet console
    ds = ray.data.from_items(rows).map_batches(
        TeacherAnswerer,
        fn_constructor_kwargs=dict(model_dir=teacher_dir if isinstance(teacher_dir, dict) else str(teacher_dir), max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, top_k=top_k, device=kind, seed=seed, batch_size=batch_size),
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor, **accel,
    ).materialize()
    ds.write_parquet(str((out / "answers.parquet").resolve()))
    answered = sorted(ds.take_all(), key=lambda r: (r["instruction"], r["context"]))
    kept = [r for r in answered if str(r["response"]).strip()]
    with open(out / "answers.jsonl", "w") as f:
        for r in kept:
            f.write(json.dumps({"instruction": r["instruction"], "context": r["context"],
                                "response": str(r["response"]), "category": "bridge"}) + "\n")
    teacher_tokens = int(sum(int(r["teacher_tokens"]) for r in answered))
    secs = time.perf_counter() - t0
    say(f"bridge: {len(kept)}/{len(answered)} answers kept, {teacher_tokens:,} teacher tokens in {secs:.1f}s")
    if not kept:
        raise ValueError("the teacher gave only empty answers; raise bridge.generation.max_new_tokens "
                         "or check the teacher")
    return {"prompts": len(rows), "answers": len(kept), "teacher_tokens": teacher_tokens, "student_tokens": 0,
            "generation_s": round(secs, 3)}

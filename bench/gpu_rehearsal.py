"""GPU rehearsal: the three figures a lent GPU should produce, in one command and one JSON line.

Run it as soon as a device is lent (under 8 minutes on one H100, random weights, nothing
downloaded), and with ``--tiny`` anywhere (seconds on CPU; the test suite runs it so it cannot
rot)::

    python bench/gpu_rehearsal.py --device cuda --out rehearsal.json
    python bench/gpu_rehearsal.py --tiny --device cpu --out /tmp/rehearsal.json

Shapes and settings come from ``--config`` (default ``configs/gpt2.yaml``), chain step 0: the
source (GPT-2 XL: 48 × 1600) teaches the first anchor (GPT-2 Large: 36 × 1280), from the
config's ``shape:`` fields, built from ``transformers`` configs with random weights directly on
the device. The teacher is bf16, the student float32 under bf16 autocast, as ``cbd_ray.train``
holds them. Sections (each reports ``status`` ok / oom / error and its ``seconds``):

* ``kd_step`` — one KD training step (forward, backward, clip, AdamW) on a right-padded batch
  whose rows have different lengths (real attention and loss masks): the project's chunked
  loss (``cbd_ray.objectives.kd``, the training path) against the naive one (full
  ``[B, T−1, V]`` float32 logits of both models, ``bench/kd_step.py``'s ``_naive_loss``), with
  the config's divergence. Tokens/s, peak memory of each, and their first losses.
* ``rollouts`` — greedy decoding of a left-padded prompt batch with the teacher (bf16; the
  bridge's and SeqKD's case): ``cbd_ray.generate.sample`` compiled (CUDA graphs; the first
  call, which compiles and captures, is timed apart) and eager, and Hugging Face
  ``model.generate``. New tokens/s and how many tokens each agrees on with eager.
* ``minillm`` — ``--steps`` (20) optimiser steps of the config's objective (MiniLLM: its
  ``teacher_mix``, ``ppo_epochs``, ``max_len``, ``max_new_tokens``, pretraining term with
  ``lm_coef``/``kd_ratio`` on random token blocks) at the config's micro-batch
  (``micro_batch``, else ``batch_size / workers``), prompts of real, different lengths. It drives the objective
  directly, as ``cbd_ray.train``'s per-worker loop calls it (``objective(model, teacher,
  batch, cfg, ctx)`` with a ``StepContext``, policy term back-propagated before the
  pretraining graph is built), with a plain ``torch.optim.AdamW`` — not Ray Train, and without
  DeepSpeed, so the optimiser state is not sharded. Beside ``torch.cuda.max_memory_allocated``
  it prints ``cbd_ray.memplan.plan_distill``'s prediction for exactly this setting (one
  worker, no DeepSpeed, the same micro-batch).

The process stops the MiniLLM steps at ``--time-limit`` seconds from its start and says so
(``cut_short``). On CPU, memory is the process's peak RSS (not per variant).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, median, peak_mb, reset_peak, sync  # noqa: E402

TINY_TEACHER = {"layers": 2, "hidden": 64, "heads": 4, "ffn": 256, "vocab_size": 512}
TINY_STUDENT = {"layers": 1, "hidden": 32, "heads": 2, "ffn": 128, "vocab_size": 512}
TINY_DISTILL = {"max_len": 64, "max_new_tokens": 8}


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and batches: seconds on CPU")
    ap.add_argument("--config", default=str(ROOT / "configs" / "gpt2.yaml"))
    ap.add_argument("--out", help="also write the JSON line to this file")
    ap.add_argument("--sections", default="kd_step,rollouts,minillm")
    ap.add_argument("--steps", type=int, default=20, help="MiniLLM optimiser steps")
    ap.add_argument("--kd-batch", type=int, default=None, help="KD step rows (default 8; tiny 2)")
    ap.add_argument("--kd-seq", type=int, default=None, help="KD step longest row (default 512; tiny 32)")
    ap.add_argument("--kd-steps", type=int, default=3, help="timed KD steps per variant (after one warm-up)")
    ap.add_argument("--prompt", type=int, default=None, help="longest prompt, tokens (default 128; tiny 8)")
    ap.add_argument("--roll-batch", type=int, default=None, help="rollout rows (default: the micro-batch)")
    ap.add_argument("--new-tokens", type=int, default=None, help="rollout new tokens (default 128; tiny 8)")
    ap.add_argument("--time-limit", type=float, default=420.0, help="stop MiniLLM steps after this many seconds")
    a = ap.parse_args(argv)
    a.kd_batch = a.kd_batch or (2 if a.tiny else 8)
    a.kd_seq = a.kd_seq or (32 if a.tiny else 512)
    a.prompt = a.prompt or (8 if a.tiny else 128)
    a.new_tokens = a.new_tokens or (8 if a.tiny else 128)
    return a


# ------------------------------------------------------------------------------ setup


def chain_step(a: argparse.Namespace) -> tuple[dict, dict, Any]:
    """(teacher shape, student shape, DistillConfig) of chain step 0 of ``a.config``, set for
    one worker without DeepSpeed, one micro-batch a step, at the configured micro-batch
    (tiny: toy shapes, ``TINY_DISTILL`` lengths, micro-batch 2)."""
    from cbd_ray.schema import load_config
    from cbd_ray.train import DistillConfig

    chain = load_config(a.config)
    settings = dict(chain.step_distill(0))
    base = DistillConfig(**settings)
    micro = 2 if a.tiny else base.micro
    teacher, student = chain.source.shape.model_dump(), chain.anchors[0].shape.model_dump()
    if a.tiny:
        teacher, student = dict(TINY_TEACHER), dict(TINY_STUDENT)
        settings.update(TINY_DISTILL)
    settings.update(workers=1, batch_size=micro, micro_batch=None, deepspeed=None, steps=a.steps,
                    device=a.device, log_every=0)
    if settings.get("lm_data"):  # the pretraining term reads random token blocks here, no file
        settings["lm_data"] = "random token blocks (gpu_rehearsal)"
    return teacher, student, DistillConfig(**settings)


def gpt2_config(shape: dict, positions: int) -> Any:
    """A GPT-2 ``transformers`` config of ``shape`` (EOS = pad = the last id, as GPT-2's 50256)."""
    from transformers import GPT2Config

    v = int(shape["vocab_size"])
    return GPT2Config(vocab_size=v, n_positions=positions, n_embd=shape["hidden"], n_layer=shape["layers"],
                      n_head=shape["heads"], n_inner=shape.get("ffn"), bos_token_id=v - 1, eos_token_id=v - 1,
                      pad_token_id=v - 1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def build(config: Any, dtype: Any, device: Any, seed: int) -> Any:
    """A randomly initialised causal LM, its weights created on ``device`` (no host copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with device:
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def rows_batch(n: int, longest: int, vocab: int, seed: int, prompt_only: bool = False) -> dict:
    """A collated, right-padded batch (``cbd_ray.data.collate``) of ``n`` rows of different
    lengths up to ``longest`` (the first row is the longest, so every batch is as wide): the
    first quarter of each row is its prompt (``prompt_only``: the whole row is)."""
    import torch

    from cbd_ray.data import collate

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = longest if i == 0 else int(torch.randint(longest // 2, longest + 1, (1,), generator=g))
        prompt = length if prompt_only else max(1, length // 4)
        ids = torch.randint(0, vocab - 1, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * prompt + [1] * (length - prompt), "prompt_length": prompt,
                     "length": length})
    return collate(rows, pad=vocab - 1)


def _autocast(device: Any) -> Any:
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if device.type != "cpu" else contextlib.nullcontext()


def _release(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


# ------------------------------------------------------------------------------ sections


def kd_step(a: argparse.Namespace, teacher: Any, student: Any, cfg: Any, vocab: int, device: Any) -> dict:
    """The chunked KD step against the naive one on one padded batch: tokens/s (median of
    ``a.kd_steps`` after a warm-up), peak memory, and both first losses (same weights)."""
    import torch

    from bench.kd_step import _naive_loss
    from cbd_ray import objectives

    kcfg = cfg.model_copy(update={"objective": "kd"})
    batch = {k: v.to(device) for k, v in rows_batch(a.kd_batch, a.kd_seq, vocab, seed=1).items()}
    ctx = objectives.StepContext(vocab=vocab)
    naive_args = SimpleNamespace(divergence=kcfg.divergence)
    losses = {"naive": lambda: _naive_loss(naive_args, teacher, student, batch),
              "ours": lambda: objectives.kd(student, teacher, batch, kcfg, ctx)[0]}
    with torch.no_grad(), _autocast(device):
        first = {k: float(fn()) for k, fn in losses.items()}
    out: dict[str, Any] = {"divergence": kcfg.divergence, "batch": a.kd_batch, "longest": a.kd_seq,
                           "tokens": int(batch["attention_mask"].sum()),
                           "counted_tokens": int(batch["loss_mask"][:, 1:].sum()),
                           "loss_abs_diff": abs(first["naive"] - first["ours"])}
    student.train()
    for name, loss_fn in losses.items():
        opt = torch.optim.AdamW(student.parameters(), lr=1e-7, betas=(0.9, 0.95))

        def step() -> float:
            with _autocast(device):
                loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), kcfg.grad_clip or 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        _release(device)
        before = reset_peak(device.type)
        times = [_timed(step, device.type)[0] for _ in range(1 + a.kd_steps)][1:]
        out.update({f"{name}_tokens_per_s": out["tokens"] / median(times), f"{name}_step_s": median(times),
                    f"{name}_peak_mb": peak_mb(device.type), f"{name}_step_extra_mb": peak_mb(device.type) - before,
                    f"{name}_first_loss": first[name]})
        del opt
    student.zero_grad(set_to_none=True)
    out["speed_ratio"] = out["ours_tokens_per_s"] / out["naive_tokens_per_s"]
    out["peak_ratio"] = out["ours_peak_mb"] / out["naive_peak_mb"]
    return out


def rollouts(a: argparse.Namespace, teacher: Any, micro: int, vocab: int, device: Any) -> dict:
    """Greedy rollouts of the teacher: ``sample`` compiled and eager, and ``model.generate``,
    on one left-padded prompt batch; new tokens/s and agreement with eager."""
    import torch

    from cbd_ray.generate import sample, stop_ids

    rows = a.roll_batch or micro
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab - 1, (rows, a.prompt), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, rows):  # left padding of 0..P/2 tokens (row 0 is full)
        mask[i, : int(torch.randint(0, a.prompt // 2 + 1, (1,), generator=g))] = 0
    pad, eos = vocab - 1, stop_ids(teacher)
    ids, mask = ids.masked_fill(mask == 0, pad).to(device), mask.to(device)
    accel = device.type != "cpu"
    kw = dict(do_sample=False, eos_token_id=eos, pad_token_id=pad)
    runs = {
        "compiled": lambda: sample(teacher, ids, mask, a.new_tokens, compile=accel, **kw).sequences,
        "eager": lambda: sample(teacher, ids, mask, a.new_tokens, compile=False, **kw).sequences,
        "generate": lambda: teacher.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                                             do_sample=False, eos_token_id=eos or None, pad_token_id=pad),
    }
    out: dict[str, Any] = {"model": "teacher", "rows": rows, "prompt": a.prompt, "new_tokens": a.new_tokens,
                           "compiled_active": accel}
    seqs = {}
    with torch.no_grad():
        for name, fn in runs.items():
            first_s, _ = _timed(fn, device.type)
            times, seq = zip(*[_timed(fn, device.type) for _ in range(2)])
            new = seq[-1].shape[1] - a.prompt
            seqs[name] = seq[-1][:, a.prompt:]
            out.update({f"{name}_first_call_s": first_s, f"{name}_s": min(times),
                        f"{name}_tokens_per_s": rows * new / min(times)})
    for name in ("compiled", "generate"):
        n = min(seqs[name].shape[1], seqs["eager"].shape[1])
        out[f"{name}_agree_with_eager"] = float((seqs[name][:, :n] == seqs["eager"][:, :n]).float().mean())
    out["compiled_speedup"] = out["compiled_tokens_per_s"] / out["eager_tokens_per_s"]
    out["eager_vs_generate"] = out["eager_tokens_per_s"] / out["generate_tokens_per_s"]
    return out


def _held_cache_mb(*models: Any) -> float:
    """Static KV caches ``cbd_ray.generate`` keeps on models between compiled rollouts."""
    total = 0
    for m in models:
        held = m.__dict__.get("_cbd_static_cache")
        for layer in getattr(held[-1], "layers", []) if held else []:
            total += sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None),
                                                                 getattr(layer, "values", None)) if t is not None)
    return total / 2**20


def minillm(a: argparse.Namespace, teacher: Any, student: Any, cfg: Any, configs: tuple, vocab: int,
            device: Any, deadline: float) -> dict:
    """``a.steps`` optimiser steps of ``cfg.objective`` as one worker of ``cbd_ray.train`` runs
    them (one micro-batch a step), with the memory plan's prediction beside the measured peak."""
    import torch

    from cbd_ray import objectives
    from cbd_ray.generate import stop_ids
    from cbd_ray.memplan import plan_distill
    from cbd_ray.train import uses_lm_text

    plan = plan_distill(cfg, configs[0], configs[1], 1, device.type)
    objective = objectives.build(cfg.objective)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    lm_on = uses_lm_text(cfg) and bool(cfg.lm_data)
    two_backwards = lm_on and cfg.objective == "minillm"  # as train's backwards_per_micro
    pad, eos, micro = vocab - 1, stop_ids(student), cfg.micro
    _release(device)
    loaded = reset_peak(device.type)
    times, fresh, losses = [], [], []
    for step in range(a.steps):
        if time.time() > deadline:
            break
        b = {k: v.to(device) for k, v in rows_batch(micro, a.prompt, vocab, seed=100 + step, prompt_only=True).items()}
        lm = None
        if lm_on:
            lm = torch.randint(0, vocab - 1, (micro, cfg.max_len), generator=torch.Generator().manual_seed(step)).to(device)
        ctx = objectives.StepContext(step=step, micro=0, vocab=vocab, pad_id=pad, eos_id=eos, max_len=cfg.max_len,
                                     lm_batch=lm, generator=torch.Generator(device=device).manual_seed(step),
                                     backward=(lambda part: part.backward()) if two_backwards else None)

        def one_step() -> float:
            with _autocast(device):
                loss, _ = objective(student, teacher, b, cfg, ctx)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        dt, loss = _timed(one_step, device.type)
        times.append(dt)
        fresh.append(cfg.objective != "minillm" or step % cfg.ppo_epochs == 0)
        losses.append(loss)
    peak = peak_mb(device.type)
    roll = [t for t, f in zip(times, fresh) if f][1:] or times[:1]  # the first includes compiling
    upd = [t for t, f in zip(times, fresh) if not f] or times[:1]
    return {"objective": cfg.objective, "micro_batch": micro, "max_len": cfg.max_len,
            "max_new_tokens": cfg.max_new_tokens, "teacher_mix": cfg.teacher_mix, "ppo_epochs": cfg.ppo_epochs,
            "lm_term": lm_on, "steps": a.steps, "steps_done": len(times), "cut_short": len(times) < a.steps,
            "first_step_s": times[0], "rollout_step_s": median(roll), "update_step_s": median(upd),
            "total_step_s": sum(times), "first_loss": losses[0], "last_loss": losses[-1],
            "after_load_mb": loaded, "peak_mb": peak, "held_kv_cache_mb": _held_cache_mb(student, teacher),
            "plan_total_mb": plan.total / 2**20, "plan_peak_phase": plan.phase,
            "plan_parts_mb": {k: v / 2**20 for k, v in plan.parts.items()},
            "peak_over_plan": peak / max(plan.total / 2**20, 1e-9),
            "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS"}


# ------------------------------------------------------------------------------ driver


def run_section(name: str, fn: Callable[..., dict], *args: Any) -> dict:
    """One section, timed; an out-of-memory or any error is reported in its entry (the JSON
    line always comes out), with the traceback on stderr."""
    import torch

    print(f"gpu_rehearsal: {name} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    try:
        out = {"status": "ok", **fn(*args)}
    except torch.OutOfMemoryError as e:
        out = {"status": "oom", "error": str(e).splitlines()[0][:400]}
    except Exception as e:  # noqa: BLE001 - the rehearsal reports every section
        traceback.print_exc()
        out = {"status": "error", "error": f"{type(e).__name__}: {e}"[:600]}
    out["seconds"] = time.perf_counter() - t
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _rounded(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4) if math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def main(argv: list[str] | None = None) -> dict:
    a = _args(argv)
    start = time.time()
    import torch

    if a.device == "cpu":
        torch.set_num_threads(1 if a.tiny else torch.get_num_threads())
    device = torch.device(a.device)
    t_shape, s_shape, cfg = chain_step(a)
    positions = 128 if a.tiny else 1024
    configs = (gpt2_config(t_shape, positions), gpt2_config(s_shape, positions))
    vocab = int(s_shape["vocab_size"])
    teacher = build(configs[0], torch.bfloat16 if a.device == "cuda" else torch.float32, device, seed=1)
    teacher.eval().requires_grad_(False)
    student = build(configs[1], torch.float32, device, seed=0)
    result: dict[str, Any] = {
        "bench": "gpu_rehearsal", "device": a.device, "tiny": a.tiny, "config": Path(a.config).name,
        "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None,
        "teacher_shape": t_shape, "student_shape": s_shape, "build_s": time.time() - start}
    wanted = set(a.sections.split(","))
    if "kd_step" in wanted:
        result["kd_step"] = run_section("kd_step", kd_step, a, teacher, student, cfg, vocab, device)
    if "rollouts" in wanted:
        result["rollouts"] = run_section("rollouts", rollouts, a, teacher, cfg.micro, vocab, device)
    if "minillm" in wanted:
        result["minillm"] = run_section("minillm", minillm, a, teacher, student, cfg, configs, vocab, device,
                                        start + a.time_limit)
    result["total_s"] = time.time() - start
    line = json.dumps(_rounded(result), sort_keys=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()

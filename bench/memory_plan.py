"""The memory plan (cbd_ray.memplan) against measured peaks of real training steps on CPU.

Each case builds GPT-2 shaped models with random weights (``transformers.GPT2Config`` +
``GPT2LMHeadModel``, vocabulary 50257, dropout 0.1 as the pretrained configs: SDPA then
takes the math kernel on CPU), and runs a few training steps of the project's own code path
per micro-batch: ``cbd_ray.objectives`` (sft, or kd with a frozen teacher of the same shape
and rkl), ``loss.backward()``, gradient clipping, AdamW step, ``zero_grad(set_to_none=True)``
— float32 on CPU, with and without gradient checkpointing (``use_reentrant=False``, as the
training loop enables it). Rows are 512 tokens, the first quarter prompt, one row padded by
8 tokens (a padding mask, as collated batches have).

Measured: the process's resident memory (RSS). Each case runs in its own interpreter. After
the models are built, the baseline RSS is read; a thread samples RSS (psutil) every 2 ms
during the steps, and ``ru_maxrss`` (the kernel's high-water mark) gives the exact peak; the
reported peak is ``ru_maxrss − baseline``. RSS includes what glibc's allocator keeps after
frees (heap caching); PyTorch's CPU allocator has no cache of its own. Predicted: the plan's
total less what is already resident at the baseline (the process itself, the student's
weights, the teacher) — i.e. gradients + optimizer moments + the largest phase.

    python bench/memory_plan.py [--steps 2] [--cases base-sft-4,...] [--out docs/bench_memory_plan_cpu.json]

Prints one line per case (predicted, measured, ratio) and writes the JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"base": dict(n_layer=12, n_embd=768, n_head=12), "medium": dict(n_layer=24, n_embd=1024, n_head=16)}
#: name -> (shape, objective, rows, gradient checkpointing)
CASES = {
    "base-sft-4": ("base", "sft", 4, False),
    "base-sft-4-ckpt": ("base", "sft", 4, True),
    "base-kd-4": ("base", "kd", 4, False),
    "base-kd-4-ckpt": ("base", "kd", 4, True),
    "medium-sft-2": ("medium", "sft", 2, False),
    "medium-sft-2-ckpt": ("medium", "sft", 2, True),
    "medium-kd-2": ("medium", "kd", 2, False),
}
SEQ, VOCAB = 512, 50257


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    """The kernel's peak RSS of this process since the last reset (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _config(shape: str):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_positions=1024, **SHAPES[shape])


def _batch(rows: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    attn = torch.ones(rows, SEQ, dtype=torch.long)
    attn[-1, -8:] = 0  # one padded row: the batch carries a padding mask
    loss_mask = attn.clone()
    loss_mask[:, : SEQ // 4] = 0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask,
            "prompt_length": torch.full((rows,), SEQ // 4)}


def _distill_cfg(objective: str, rows: int, ckpt: bool):
    from cbd_ray.train import DistillConfig

    return DistillConfig(objective=objective, divergence="rkl", batch_size=rows, micro_batch=rows, max_len=SEQ,
                         gradient_checkpointing=ckpt, device="cpu", workers=1)


class _Sampler:
    """Highest RSS seen by a thread polling every ``period`` seconds."""

    def __init__(self, period: float = 0.002) -> None:
        self.peak, self.period, self._stop = 0, period, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.period)

    def __enter__(self) -> "_Sampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def _warm_up(fn, student, teacher, cfg, ctx) -> None:
    """One tiny step (1 row × 16 tokens): code pages, thread pools and one-time buffers are
    resident before the baseline, so the measurement sees only what the batch costs."""
    import torch

    b = {k: v[:1, :16].clone() for k, v in _batch(1).items() if k != "prompt_length"}
    b["loss_mask"][:, 8:] = 1
    b["prompt_length"] = torch.tensor([8])
    loss, _ = fn(student, teacher, b, cfg, ctx)
    loss.backward()
    student.zero_grad(set_to_none=True)


def run_case(name: str, steps: int) -> dict:
    """One case in this process: build, warm up, baseline, steps; measured and predicted bytes."""
    import gc

    import torch
    from transformers import GPT2LMHeadModel

    from cbd_ray import memplan, objectives

    shape, objective, rows, ckpt = CASES[name]
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    student = GPT2LMHeadModel(_config(shape)).train()
    if ckpt:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = GPT2LMHeadModel(_config(shape)).eval().requires_grad_(False) if objective == "kd" else None
    cfg = _distill_cfg(objective, rows, ckpt)
    fn = objectives.build(objective)
    ctx = objectives.StepContext(vocab=VOCAB, pad_id=0, eos_id=VOCAB - 1, max_len=SEQ)
    _warm_up(fn, student, teacher, cfg, ctx)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
    batch = _batch(rows)
    gc.collect()
    base = _rss()
    exact = _reset_hwm()
    times = []
    with _Sampler() as sampler:
        for _ in range(steps):
            t0 = time.time()
            loss, _ = fn(student, teacher, batch, cfg, ctx)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
            times.append(time.time() - t0)
    peak = _hwm() if exact else sampler.peak
    plan = memplan.plan_distill(cfg, student.config if teacher is None else teacher.config, student.config, 1, "cpu",
                                stage=name)
    # resident at the baseline: the process itself, the student's weights, the teacher
    already = memplan.CPU_PROCESS + plan.parts["weights"] + plan.parts["teacher"]
    live = os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None
    predicted = plan.total - already - (memplan.CPU_OVERHEAD - memplan.CPU_PROCESS if live else 0)
    return {"case": name, "shape": shape, "objective": objective, "rows": rows, "seq": SEQ, "checkpointing": ckpt,
            "allocator": "live" if live else "default", "steps": steps, "baseline_rss": base, "peak_rss": peak,
            "peak_exact": exact, "measured": peak - base, "measured_sampled": sampler.peak - base,
            "predicted": predicted, "ratio": predicted / (peak - base), "plan_parts": plan.parts,
            "plan_total": plan.total, "plan_phase": plan.phase, "step_s": times}


def _child(name: str, steps: int, allocator: str) -> dict:
    """``name`` in a fresh interpreter. allocator "live": glibc maps every allocation of 64 KiB
    or more on its own and unmaps it at free (MALLOC_MMAP_THRESHOLD_), so RSS follows the live
    tensors; "default": glibc as a run gets it, which keeps freed heap memory resident."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        if allocator == "live":
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        subprocess.run([sys.executable, __file__, "--case", name, "--steps", str(steps), "--result", str(out)],
                       check=True, env=env)
        return json.loads(out.read_text())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> dict:
    import psutil

    return {"cpu": _cpu_name(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": None,
            "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names: " + ", ".join(CASES))
    ap.add_argument("--steps", type=int, default=2, help="training steps per case (>= 2: moments exist in step 2)")
    ap.add_argument("--allocator", choices=("default", "live", "both"), default="both",
                    help="glibc as runs get it, RSS following live tensors (MALLOC_MMAP_THRESHOLD_), or both")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_memory_plan_cpu.json"))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        Path(a.result).write_text(json.dumps(run_case(a.case, a.steps)))
        return
    import torch
    import transformers

    rows = []
    print(f"{'case':<20}{'allocator':>10}{'predicted MiB':>15}{'measured MiB':>14}{'sampled MiB':>13}"
          f"{'ratio':>8}{'step s':>8}")
    allocators = ("live", "default") if a.allocator == "both" else (a.allocator,)
    for name in a.cases.split(","):
        for alloc in allocators:
            r = _child(name, a.steps, alloc)
            rows.append(r)
            print(f"{name:<20}{alloc:>10}{r['predicted'] / 2**20:>15,.0f}{r['measured'] / 2**20:>14,.0f}"
                  f"{r['measured_sampled'] / 2**20:>13,.0f}{r['ratio']:>8.3f}"
                  f"{sum(r['step_s']) / len(r['step_s']):>8.1f}", flush=True)
    doc = {"bench": "memory_plan", "device": "cpu", "machine": _machine(), "torch": torch.__version__,
           "transformers": transformers.__version__, "command": "python bench/memory_plan.py " + " ".join(sys.argv[1:]),
           "cases": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({f"{r['case']}/{r['allocator']}": round(r["ratio"], 3) for r in rows}))


if __name__ == "__main__":
    main()

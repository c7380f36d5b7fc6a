"""One distillation training step: the training path against a naive Hugging Face step.

* naive: ``student(ids).logits`` and ``teacher(ids).logits`` over the full vocabulary, both
  upcast to float32, the divergence over the whole ``[B, T−1, V]`` next-token tensor (masked
  mean), backward, gradient clipping, AdamW step.
* ours: exactly what ``cbd_ray.train`` runs per micro-batch: ``cbd_ray.objectives.kd`` (the
  models' own forward with ``logits_to_keep=1`` for the final hidden states, teacher under
  ``no_grad``, then ``cbd_ray.losses.kd_loss_from_hidden`` projecting counted tokens only, a
  chunk at a time, the chunk chosen from the ``DistillConfig.kd_chunk_bytes`` budget), then
  backward, gradient clipping, AdamW step.
* rows1024: the same training path with ``chunk_size=1024`` rows (the old default, which
  holds every counted token's logits at once when a micro-batch has ≤ 1024 of them).

GPT-2 shaped random models (vocabulary 50257); the first quarter of each sequence is "prompt"
(masked out), as in instruction distillation. Each variant runs in its own subprocess so its
peak memory is its own: peak RSS (``ru_maxrss``) on CPU — tracemalloc does not see torch's
allocator — and ``torch.cuda.max_memory_allocated`` on GPU, where all run under bf16
autocast. Prints a line per variant and ends with one JSON line with the ratios side by side.

    python bench/kd_step.py [--device cpu|cuda] [--teacher-shape 4x256] [--student-shape 2x128]
                            [--batch 4] [--seq 128] [--steps 3] [--chunk-bytes 134217728]

Goal (GPU): >= 3x the naive step's tokens/s and <= 0.5x its peak memory; on CPU the ratio at
a size that fits.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import median, parse_shape, peak_mb, reset_peak, run_variant, sync  # noqa: E402


def _build(a):
    import torch

    from cbd_ray.tiny import make_tiny_model

    dev = torch.device(a.device)
    teacher = make_tiny_model("gpt2", seed=1, vocab_size=a.vocab, max_positions=max(1024, a.seq),
                              **parse_shape(a.teacher_shape)).to(dev).eval().requires_grad_(False)
    student = make_tiny_model("gpt2", seed=0, vocab_size=a.vocab, max_positions=max(1024, a.seq),
                              **parse_shape(a.student_shape)).to(dev).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(dev)
    loss_mask = torch.zeros(a.batch, a.seq, dtype=torch.long, device=dev)
    loss_mask[:, a.seq // 4:] = 1  # response tokens only
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask,
             "prompt_length": torch.full((a.batch,), a.seq // 4, device=dev)}
    return teacher, student, batch


def _naive_loss(a, teacher, student, batch):
    import torch

    from cbd_ray.losses import DIVERGENCES

    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = batch["loss_mask"][:, 1:].bool()  # next-token targets, as the objectives count them
    s_logits = student(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    if a.divergence == "fkl":  # written out, as a typical training script has it
        log_q = torch.log_softmax(s_logits, -1)
        log_p = torch.log_softmax(t_logits, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)[mask].mean()
    return DIVERGENCES[a.divergence](s_logits, t_logits, mask)  # the same pure function, unchunked


def _step_fn(a, teacher, student, batch):
    import torch

    from cbd_ray import objectives
    from cbd_ray.train import DistillConfig

    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95))
    cuda = a.device.startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    cfg = DistillConfig(objective="kd", divergence=a.divergence, device="cpu" if not cuda else "cuda",
                        chunk_size=1024 if a.variant == "rows1024" else (a.chunk_size or None),
                        kd_chunk_bytes=a.chunk_bytes)
    ctx = objectives.StepContext(vocab=a.vocab)

    def step():
        with autocast():
            if a.variant == "naive":
                loss = _naive_loss(a, teacher, student, batch)
            else:  # the training loop's call (cbd_ray.train: objective(model, teacher, batch, cfg, ctx))
                loss, _ = objectives.kd(student, teacher, batch, cfg, ctx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def worker(a) -> dict:
    import torch

    torch.manual_seed(0)
    teacher, student, batch = _build(a)
    step = _step_fn(a, teacher, student, batch)
    before = reset_peak(a.device)
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        sync(a.device)
        t = time.perf_counter()
        losses.append(step())
        sync(a.device)
        dt = time.perf_counter() - t
        if i >= a.warmup:
            times.append(dt)
        print(f"  {a.variant}: step {i + 1}/{a.warmup + a.steps} {dt:.2f}s loss {losses[-1]:.4f}", flush=True)
    tokens = a.batch * a.seq
    from cbd_ray.losses import kd_chunk_rows

    head = student.get_output_embeddings()
    chunk = 1024 if a.variant == "rows1024" else (a.chunk_size or kd_chunk_rows(
        head, teacher.get_output_embeddings(), a.vocab, a.divergence, a.chunk_bytes))
    return {
        "chunk_rows": None if a.variant == "naive" else chunk,
        "tokens_per_s": tokens / median(times),
        "step_s": median(times),
        "peak_mb": peak_mb(a.device),
        "before_steps_mb": before,
        "first_loss": losses[0],
    }


VARIANTS = ("naive", "rows1024", "ours")


def _args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--teacher-shape", default="4x256", help="LAYERSxHIDDEN (heads = hidden/64)")
    ap.add_argument("--student-shape", default="2x128")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--divergence", default="fkl", choices=["fkl", "rkl", "jsd", "sfkl", "srkl"],
                    help="the divergence of every variant (the naive one computes it on full logits)")
    ap.add_argument("--chunk-bytes", type=int, default=128 * 2**20,
                    help="DistillConfig.kd_chunk_bytes of the training path (default its default, 128 MiB)")
    ap.add_argument("--chunk-size", type=int, default=0, help="rows per chunk instead of the byte budget (0: budget)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each variant; the fastest counts")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per variant (default: 1 on CPU, where a shared machine's other load "
                         "makes multi-threaded runs stall unpredictably; torch's default on GPU)")
    ap.add_argument("--plot", help="also write a PNG of the figures here (ours vs naive)")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args()


def _summary(a, res: dict[str, dict]) -> dict:
    n = res["naive"]
    out = {"bench": "kd_step", "device": a.device, "divergence": a.divergence, "teacher_shape": a.teacher_shape,
           "student_shape": a.student_shape, "vocab": a.vocab, "batch": a.batch, "seq": a.seq,
           "chunk_bytes": a.chunk_bytes, "rounds": a.rounds, "threads": a.threads,
           "memory": "peak RSS (ru_maxrss) of the variant's process" if a.device == "cpu"
           else "torch.cuda.max_memory_allocated",
           "baseline_tokens_per_s": round(n["tokens_per_s"], 1), "baseline_peak_mb": round(n["peak_mb"], 1),
           "baseline_step_extra_mb": round(n["extra_mb"], 1)}
    for v, key in (("ours", "ours"), ("rows1024", "rows1024")):
        r = res[v]
        out.update({f"{key}_chunk_rows": r["chunk_rows"], f"{key}_tokens_per_s": round(r["tokens_per_s"], 1),
                    f"{key}_peak_mb": round(r["peak_mb"], 1), f"{key}_step_extra_mb": round(r["extra_mb"], 1),
                    f"{key}_speed_ratio": round(r["tokens_per_s"] / n["tokens_per_s"], 3),
                    f"{key}_peak_ratio": round(r["peak_mb"] / n["peak_mb"], 3),
                    f"{key}_step_extra_ratio": round(r["extra_mb"] / n["extra_mb"], 3) if n["extra_mb"] > 0 else None,
                    f"{key}_loss_abs_diff": abs(r["first_loss"] - n["first_loss"])})
    out["speed_ratio"], out["peak_ratio"] = out["ours_speed_ratio"], out["ours_peak_ratio"]
    return out


def main() -> None:
    a = _args()
    if a.threads is None and not a.device.startswith("cuda"):
        a.threads = 1
    if a.variant:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        Path(a.result).write_text(json.dumps(worker(a)))
        return

    argv = [x for x in sys.argv[1:]]
    # Variants alternate over --rounds fresh processes and each keeps its fastest round: on a
    # shared machine the load drifts, and alternating exposes all to the same drift.
    res: dict[str, dict] = {}
    for rnd in range(a.rounds):
        for variant in VARIANTS:
            print(f"round {rnd + 1}/{a.rounds}: {variant} step ...", flush=True)
            r = run_variant(Path(__file__), variant, argv)
            r["extra_mb"] = r["peak_mb"] - r["before_steps_mb"]
            print(f"{variant}: {r['tokens_per_s']:.0f} tokens/s, {r['step_s']:.2f} s/step, peak {r['peak_mb']:.0f} MiB "
                  f"(before steps {r['before_steps_mb']:.0f} MiB), chunk {r['chunk_rows']}, loss {r['first_loss']:.4f}",
                  flush=True)
            best = res.get(variant)
            if best is None:
                res[variant] = r
            else:  # fastest time, largest memory
                best["tokens_per_s"] = max(best["tokens_per_s"], r["tokens_per_s"])
                best["peak_mb"] = max(best["peak_mb"], r["peak_mb"])
                best["extra_mb"] = max(best["extra_mb"], r["extra_mb"])
    summary = _summary(a, res)
    if a.plot:
        from bench._common import plot_summary

        print(f"plot: {plot_summary(summary, 'tokens_per_s', 'tokens/s', a.plot)}", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

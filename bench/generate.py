"""Batched sampling: ``cbd_ray.generate.sample`` against ``model.generate``, same model and batch.

A GPT-2 shaped random model (vocabulary 50257) continues a batch of left-padded random prompts
for exactly ``--new-tokens`` tokens (no EOS, so both do the same amount of work), greedy by
default (then the two token streams must agree, which is checked) or sampling with a fixed
seed (``--sample``). Each variant runs in its own subprocess (peak memory its own), variants
alternate over ``--rounds`` and keep their fastest round. Ends with one JSON line.

    python bench/generate.py [--device cpu|cuda] [--shape 4x256] [--batch 8] [--prompt 32]
                             [--new-tokens 64] [--sample] [--compile]

Goal (GPU, GPT-2-medium shape 24x1024, batch 64, 128 new tokens): >= 10x ``generate``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import parse_shape, peak_mb, reset_peak, run_variant, sync  # noqa: E402

PAD = 50256  # GPT-2's <|endoftext|>, its usual pad


def worker(a) -> dict:
    import torch

    from cbd_ray.generate import sample
    from cbd_ray.tiny import make_tiny_model

    dev = torch.device(a.device)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    model = make_tiny_model("gpt2", seed=0, vocab_size=a.vocab, max_positions=1024, **parse_shape(a.shape))
    model = model.to(dev, dtype).eval()
    model.generation_config.eos_token_id = None  # run every row to --new-tokens
    model.generation_config.pad_token_id = PAD
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab - 1, (a.batch, a.prompt), generator=g)
    mask = torch.ones_like(ids)
    for i in range(a.batch):  # left padding of 0..prompt/2 tokens
        mask[i, : int(torch.randint(0, a.prompt // 2 + 1, (1,), generator=g))] = 0
    ids = ids.masked_fill(mask == 0, PAD).to(dev)
    mask = mask.to(dev)

    def ours(seed: int):
        gen = torch.Generator(device=dev).manual_seed(seed)
        return sample(model, ids, mask, a.new_tokens, do_sample=a.sample, pad_token_id=PAD,
                      generator=gen, compile=a.compile).sequences

    def hf(seed: int):
        torch.manual_seed(seed)
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                              min_new_tokens=a.new_tokens, do_sample=a.sample, pad_token_id=PAD)

    fn = {"ours": ours, "generate": hf}[a.variant]
    reset_peak(a.device)
    times = []
    for i in range(a.warmup + a.repeats):
        sync(a.device)
        t = time.perf_counter()
        out = fn(i)
        sync(a.device)
        dt = time.perf_counter() - t
        if i >= a.warmup:
            times.append(dt)
        print(f"  {a.variant}: run {i + 1}/{a.warmup + a.repeats} {dt:.2f}s", flush=True)
    new = out[:, a.prompt:]
    assert new.shape == (a.batch, a.new_tokens), new.shape
    return {
        "new_tokens_per_s": a.batch * a.new_tokens / min(times),
        "seconds": min(times),
        "peak_mb": peak_mb(a.device),
        "digest": hashlib.sha256(new.cpu().numpy().tobytes()).hexdigest()[:16],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="4x256", help="LAYERSxHIDDEN (heads = hidden/64)")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sample", action="store_true", help="sample (fixed seeds) instead of greedy")
    ap.add_argument("--compile", action="store_true", help="compile our decode step (CUDA graphs; CUDA only)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each variant; the fastest counts")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per variant (default: 1 on CPU, where a shared machine's other load "
                         "makes multi-threaded runs stall unpredictably; torch's default on GPU)")
    ap.add_argument("--plot", help="also write a PNG of the figures here")
    ap.add_argument("--variant", choices=["ours", "generate"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads is None and not a.device.startswith("cuda"):
        a.threads = 1
    if a.variant:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        Path(a.result).write_text(json.dumps(worker(a)))
        return

    res: dict[str, dict] = {}
    for rnd in range(a.rounds):
        for variant in ("generate", "ours"):
            print(f"round {rnd + 1}/{a.rounds}: {variant} ...", flush=True)
            r = run_variant(Path(__file__), variant, sys.argv[1:])
            print(f"{variant}: {r['new_tokens_per_s']:.0f} new tokens/s ({r['seconds']:.2f} s), "
                  f"peak {r['peak_mb']:.0f} MiB", flush=True)
            best = res.setdefault(variant, r)
            best["new_tokens_per_s"] = max(best["new_tokens_per_s"], r["new_tokens_per_s"])
            best["peak_mb"] = max(best["peak_mb"], r["peak_mb"])
    o, g = res["ours"], res["generate"]
    summary = {
        "bench": "generate",
        "device": a.device, "shape": a.shape, "vocab": a.vocab, "batch": a.batch, "prompt": a.prompt,
        "new_tokens": a.new_tokens, "mode": "sample" if a.sample else "greedy", "compile": a.compile,
        "rounds": a.rounds, "threads": a.threads,
        "ours_new_tokens_per_s": round(o["new_tokens_per_s"], 1),
        "baseline_new_tokens_per_s": round(g["new_tokens_per_s"], 1),
        "speed_ratio": round(o["new_tokens_per_s"] / g["new_tokens_per_s"], 3),
        "ours_peak_mb": round(o["peak_mb"], 1),
        "baseline_peak_mb": round(g["peak_mb"], 1),
        "peak_ratio": round(o["peak_mb"] / g["peak_mb"], 3),
        "same_tokens": o["digest"] == g["digest"] if not a.sample else None,
    }
    if a.plot:
        from bench._common import plot_summary

        print(f"plot: {plot_summary(summary, 'new_tokens_per_s', 'new tokens/s', a.plot)}", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Multiple-choice scoring speed: batched, row-sharing scoring against one request at a time.

A random GPT-2-shaped model (vocabulary 50257, ``--layers``/``--hidden``, 1024 positions)
with the real GPT-2 tokenizer scores the first ``--n`` questions of MMLU (5-shot: four
single-token continuations after one long context, so the four requests share one model
input) and of HellaSwag (four multi-token endings: nothing to share, batching only). Each
task is scored twice in one process, side by side: ``score_choices`` over all requests with
``--batch-size``, and a loop calling it on one request at a time (one forward per request,
no padding, no sharing). The scores must agree; the figure is the ratio of the two times.

    python bench/evaluate.py [--n 40] [--layers 4] [--hidden 256] [--batch-size 16] [--threads 2]

Expect MMLU to gain most (four requests per row); on CPUs batching itself gains little
(a forward of a few hundred tokens already fills the cores), on GPUs it is the main gain.
Prints one line per task and ends with one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40, help="questions per task")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch threads (set here so runs compare)")
    p.add_argument("--data-dir", default=str(SHARED))
    a = p.parse_args()

    import torch

    from cbd_ray.evaluate import score_choices
    from cbd_ray.tasks import TASKS, load_examples
    from cbd_ray.tiny import gpt2_tokenizer, make_tiny_model

    torch.set_num_threads(a.threads)
    tok = gpt2_tokenizer(Path(a.data_dir) / "gpt2_tokenizer")
    model = make_tiny_model("gpt2", seed=0, vocab_size=len(tok), layers=a.layers, hidden=a.hidden,
                            heads=max(1, a.hidden // 64), max_positions=1024)
    figures: dict[str, float] = {}
    for name, shots in (("mmlu", 5), ("hellaswag", 0)):
        examples = load_examples(TASKS[name], a.data_dir, limit=a.n, shots=shots)
        reqs = [r for ex in examples for r in ex.requests]
        score_choices(model, tok, reqs[:4], batch_size=4)  # warm-up
        t0 = time.perf_counter()
        batched = score_choices(model, tok, reqs, batch_size=a.batch_size)
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = [score_choices(model, tok, [r], batch_size=1)[0] for r in reqs]
        t_single = time.perf_counter() - t0
        worst = max(abs(x - y) for x, y in zip(batched, single))
        assert worst < 1e-3, f"batched and single scores differ by {worst}"
        ratio = t_single / t_batched
        print(f"{name}: {len(reqs)} requests, batched {t_batched:.2f}s, one at a time {t_single:.2f}s, "
              f"speed-up {ratio:.2f}x, max |diff| {worst:.1e}", flush=True)
        figures[f"{name}_requests"] = len(reqs)
        figures[f"{name}_batched_s"] = round(t_batched, 3)
        figures[f"{name}_single_s"] = round(t_single, 3)
        figures[f"{name}_speedup"] = round(ratio, 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

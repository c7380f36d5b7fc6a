"""Teacher answers to instruction prompts (SeqKD pseudo-labels) on a Ray Data actor pool.

    ray job submit -- python jobs/pseudo_label.py --teacher DIR --data FILE --out DIR [--actors N ...]

Writes OUT/answers.jsonl (instruction, context, response = the teacher's answer), ready for
`cbd distill --objective seqkd --set seqkd_source=data --data OUT/answers.jsonl`. Uses a
running Ray (RAY_ADDRESS) or starts a local one; prints one JSON line; exits 2 on bad input."""

import argparse
import json
import sys
from pathlib import Path

from cbd_ray.errors import one_line, run_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="teacher model directory (safetensors + tokenizer)")
    p.add_argument("--data", required=True, help="instruction records (JSONL/Parquet/Hub name); responses not needed")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--gpus-per-actor", type=float, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        from cbd_ray.data import read_instructions
        from cbd_ray.stages.bridge import generate_answers
        from cbd_ray.session import connect_ray as ensure_ray
        from cbd_ray.train import _check_model_dir

        if Path(a.out).exists():
            raise FileExistsError(f"--out {a.out!r} already exists")
        _check_model_dir(a.teacher, "teacher")
        records = read_instructions(a.data, a.limit, require_response=False)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"pseudo_label: error: {one_line(exc)}", file=sys.stderr)
        return 2
    ensure_ray()
    metrics = generate_answers(a.teacher, records, a.out, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                               temperature=a.temperature, actors=a.actors, gpus_per_actor=a.gpus_per_actor,
                               device=a.device, seed=a.seed)
    print(json.dumps(metrics, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="pseudo_label"))

"""`cbd pseudo-label`: teacher answers to instruction prompts (SeqKD pseudo-labels) on a Ray Data actor pool.

Writes OUT/answers.jsonl (instruction, context, response = the teacher's answer), ready for
`cbd distill --objective seqkd --set seqkd_source=data --data OUT/answers.jsonl`. Uses a
running Ray (RAY_ADDRESS) or starts a local one; prints one JSON line; exits 2 on bad input.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher model directory (safetensors + tokenizer)")
    parser.add_argument("--data", required=True,
                        help="instruction records (JSONL/Parquet/Hub name); responses not needed")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--gpus-per-actor", type=float, default=0,
                        help="accelerators (GPUs or NPUs) each teacher actor asks Ray for; 0: one on a GPU/NPU "
                             "cluster (a fraction shares a card)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"],
                        help="the teacher's device; auto takes the cluster's GPUs, then NPUs, then CPUs")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cbd_ray.checks import check_model_dir
    from cbd_ray.data import read_instructions
    from cbd_ray.session import connect_ray
    from cbd_ray.stages.bridge import generate_answers

    if Path(args.out).exists():
        raise FileExistsError(f"--out {args.out!r} already exists")
    check_model_dir(args.teacher, "teacher", tokenizer=False)  # cheap checks on the driver, before Ray
    records = read_instructions(args.data, args.limit, require_response=False)
    connect_ray()
    metrics = generate_answers(args.teacher, records, args.out, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, temperature=args.temperature, actors=args.actors,
                               gpus_per_actor=args.gpus_per_actor, device=args.device, seed=args.seed)
    print(json.dumps(metrics, sort_keys=True, default=str), flush=True)
    return 0

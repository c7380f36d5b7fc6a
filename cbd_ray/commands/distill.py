"""`cbd distill`: one chain step (a distillation) on the current Ray, a local one if none runs.

Every DistillConfig field can be set with ``--set key=value`` (e.g. ``--set warmup=10``);
the common ones have their own flags. Prints the final metrics as one JSON line; bad input
exits 2 with the error on stderr before any training starts.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

OBJECTIVES = ("sft", "kd", "on_policy", "seqkd", "minillm")
DIVERGENCES = ("fkl", "rkl", "jsd", "sfkl", "srkl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher model directory (Hugging Face, safetensors)")
    parser.add_argument("--student", required=True, help="student model directory to start from")
    parser.add_argument("--data", required=True,
                        help="instruction records: JSONL/Parquet file (instruction, context, response) or a Hub dataset")
    parser.add_argument("--out", required=True, help="output directory for the distilled student")
    parser.add_argument("--objective", choices=OBJECTIVES, default=None, help="default: kd")
    parser.add_argument("--divergence", choices=DIVERGENCES, default=None, help="default: rkl")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (records per optimiser step)")
    parser.add_argument("--micro-batch", type=int, default=None, help="records per forward on one worker")
    parser.add_argument("--max-len", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers")
    parser.add_argument("--device", choices=("auto", "cuda", "npu", "cpu"), default=None)
    parser.add_argument("--deepspeed", type=int, choices=(0, 1, 2, 3), default=None, help="ZeRO stage")
    parser.add_argument("--eval-data", default=None, help="held-out records for validation and the best checkpoint")
    parser.add_argument("--config", default=None, help="YAML file of DistillConfig fields (flags override it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any DistillConfig field, e.g. --set warmup=10 (repeatable)")
    parser.add_argument("--storage", default=None, help="where Ray Train keeps checkpoints (default: beside --out)")
    parser.add_argument("--max-failures", type=int, default=1, help="worker failures to recover from")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory made by cbd-ray (never a folder it did not write)")


def run(args: argparse.Namespace) -> int:
    from cbd_ray.config import apply_overrides, build, load_yaml
    from cbd_ray.train import DistillConfig, run_distill

    data: dict = load_yaml(args.config) if args.config else {}
    flags = {"objective": args.objective, "divergence": args.divergence, "steps": args.steps,
             "batch_size": args.batch_size, "micro_batch": args.micro_batch, "max_len": args.max_len,
             "lr": args.lr, "workers": args.workers, "device": args.device, "deepspeed": args.deepspeed}
    data.update({k: v for k, v in flags.items() if v is not None})
    data = apply_overrides(data, args.set)
    cfg = build(DistillConfig, data, source="distill settings")
    _check_inputs(args, cfg)
    metrics = run_distill(args.teacher, args.student, args.data, args.out, cfg, eval_data=args.eval_data,
                          storage_path=args.storage, max_failures=args.max_failures, overwrite=args.overwrite)
    print(json.dumps(metrics, sort_keys=True, default=str))
    sys.stdout.flush()
    return 0


def _check_inputs(args: argparse.Namespace, cfg: Any) -> None:
    """Cheap checks on the driver before Ray starts: both models opened (weights' headers and
    sizes, config, the student's tokenizer), the data read (file:line errors), the output
    rule, and the storage root writable."""
    from pathlib import Path

    from cbd_ray.checks import check_model_dir
    from cbd_ray.data import INSTRUCTION_SUFFIXES, read_instructions
    from cbd_ray.storage import MODEL_FILES, check_writable, guard_output

    check_model_dir(args.student, "student")
    if cfg.needs_teacher:
        check_model_dir(args.teacher, "teacher", tokenizer=False)
    state = guard_output(args.out, inputs={"teacher": args.teacher, "student": args.student, "--data": args.data,
                                           "--eval-data": args.eval_data, "--config": args.config},
                         overwrite=args.overwrite, marker=("distill.json", "cbd.json"), own=MODEL_FILES)
    if state == "empty" and not args.overwrite:  # run_distill replaces only with overwrite
        raise FileExistsError(f"--out {args.out} already exists (empty); pass --overwrite to use it")
    for path, limit, need in ((args.data, cfg.data_limit, cfg.needs_responses), (args.eval_data, cfg.eval_limit, True)):
        if path is not None and (Path(path).suffix in INSTRUCTION_SUFFIXES or Path(path).exists()):
            read_instructions(path, limit, require_response=need)  # local files only: a Hub set is read once, later
    if args.storage:
        check_writable(args.storage)

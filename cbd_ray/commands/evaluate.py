"""`cbd evaluate`: evaluate one model directory, one JSON object per task on stdout."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from cbd_ray.tasks import TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face model directory (safetensors)")
    parser.add_argument("--tasks", required=True,
                        help=f"comma-separated tasks ({', '.join(TASKS)}); NAME:PATH reads another file")
    parser.add_argument("--data-dir", default=None,
                        help="folder laid out like shared/data (default $CBD_DATA_DIR, else the Hub)")
    parser.add_argument("--limit", type=int, default=None, help="first N examples per task (perplexity: N windows)")
    parser.add_argument("--shots", type=int, default=0, help="MMLU few-shot examples from its dev split")
    parser.add_argument("--batch-size", type=int, default=16, help="distinct sequences per forward pass")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="greedy answer length for dolly")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"])
    parser.add_argument("--out", default=None, help="also write all results as one JSON list here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file written by cbd evaluate")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def run(args: argparse.Namespace) -> int:
    from cbd_ray.checks import check_model_dir
    from cbd_ray.evaluate import evaluate_model
    from cbd_ray.storage import atomic_write_json, guard_output_file

    # cheap checks first: the model opened and the output rule, before any evaluation runs
    check_model_dir(args.model, "model")
    out = Path(args.out) if args.out else None
    if out is not None:
        guard_output_file(out, inputs=(args.model, args.data_dir), overwrite=args.overwrite, ours=_is_results)
    # Libraries imported on the way (DeepSpeed through accelerate) log to stdout; keep stdout
    # for the JSON lines so it can be piped.
    with contextlib.redirect_stdout(sys.stderr):
        results = evaluate_model(args.model, args.tasks, data_dir=args.data_dir, limit=args.limit,
                                 batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
                                 shots=args.shots, max_new_tokens=args.max_new_tokens)
    for r in results:
        print(json.dumps(r), flush=True)
    if out is not None:
        atomic_write_json(out, results)
    return 0


def _is_results(path: Path) -> bool:
    """True when ``path`` holds what `cbd evaluate --out` writes: a JSON list of task records."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, list) and all(isinstance(r, dict) and "task" in r for r in data)

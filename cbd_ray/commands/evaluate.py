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
                        help="folder of task data (default $CBD_DATA_DIR, else the Hub): laid out like "
                             "shared/data, or other file names found by glob (boolq*/*dev*.jsonl, *boolq*.jsonl, "
                             "...); NAME:PATH in --tasks names a file outright")
    parser.add_argument("--limit", type=int, default=None,
                        help="first N examples per task (MMLU: per subject, as lm-eval; perplexity: N windows)")
    parser.add_argument("--shots", type=int, default=0, help="MMLU few-shot examples from its dev split")
    parser.add_argument("--batch-size", type=int, default=16, help="distinct sequences per forward pass")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="greedy answer length for dolly")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"])
    parser.add_argument("--out", default=None, help="also write all results as one JSON list here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file written by cbd evaluate")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--backend", choices=("native", "lm-eval"), default="native",
                        help="native (this package's scorer) or lm-eval (lm-evaluation-harness on local task files "
                             "of --data-dir: boolq, arc_easy, hellaswag, winogrande, mmlu (zero-shot); needs cbd-ray[lm-eval])")


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
        if args.backend == "lm-eval":
            results = _lm_eval(args)
        else:
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


def _lm_eval(args: argparse.Namespace) -> list:
    from cbd_ray.lm_eval_backend import evaluate_lm_eval
    from cbd_ray.tasks import default_data_dir

    data_dir = args.data_dir or default_data_dir()
    if data_dir is None:
        raise ValueError("--backend lm-eval reads local task files: give --data-dir (or set CBD_DATA_DIR)")
    if args.shots:
        raise ValueError(f"--shots {args.shots}: --backend lm-eval runs its local tasks zero-shot; "
                         "use the native backend for few-shot MMLU")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluate_lm_eval(args.model, [t.strip() for t in args.tasks.split(",") if t.strip()], data_dir,
                            limit=args.limit, batch_size=args.batch_size, device=device)

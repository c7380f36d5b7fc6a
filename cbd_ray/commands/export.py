"""`cbd export MODEL --format onnx|gguf`: edge formats of a model directory, each checked.

ONNX is checked by running onnxruntime against transformers (max |logit difference|), GGUF
(llama.cpp; gpt2, llama, qwen2, qwen3) by reading the file back tensor by tensor. Writes
OUT/model.onnx and/or OUT/model.gguf (OUT defaults to MODEL/../<name>-export) and prints
one JSON line per file; needs cbd-ray[export].
"""
from __future__ import annotations

import argparse
import json
import logging

FORMATS = ("onnx", "gguf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a Hugging Face model directory (safetensors)")
    parser.add_argument("--format", required=True, type=lambda s: [x for x in s.split(",") if x],
                        help=f"comma-separated formats: {', '.join(FORMATS)}")
    parser.add_argument("--out", default=None, help="output folder (default: <model>-export beside the model)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cbd_ray.evaluate import check_model_dir
    from cbd_ray.export import check_formats, export_model, exports_table

    formats = check_formats(args.format)
    model = check_model_dir(args.model)
    out = Path(args.out) if args.out else model.resolve().parent / f"{model.resolve().name}-export"
    records = export_model(model, out, formats)
    for r in records:
        print(json.dumps({"model": model.resolve().name, **r}), flush=True)
    logging.getLogger("cbd_ray.export").info("\n%s", exports_table([{"model": model.name, **r} for r in records]))
    return 0

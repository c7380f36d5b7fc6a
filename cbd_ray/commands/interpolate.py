"""`cbd interpolate`: make one target model between two anchors, without a cluster.

Unspecified --layers/--hidden/--heads keep the smaller anchor's value; unspecified
--kv-heads keeps the anchors' GQA group size and --ffn their ffn/hidden ratio (so both are
the smaller anchor's values when hidden and heads are). Prints the record as one JSON line;
bad input exits 2 with the error on stderr before any work.
"""
from __future__ import annotations

import argparse
import json

from cbd_ray.resize_choices import LAYER_EXPAND, LAYER_SUBSET, WIDTH_EXPAND, WIDTH_SUBSET


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small", required=True, help="the smaller anchor (Hugging Face directory, safetensors)")
    parser.add_argument("--large", required=True, help="the larger anchor, same family and vocabulary")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--layers", type=int, default=None, help="target layers (default: the smaller anchor's)")
    parser.add_argument("--hidden", type=int, default=None, help="target hidden size (default: the smaller anchor's)")
    parser.add_argument("--heads", type=int, default=None, help="target attention heads (default: the smaller anchor's)")
    parser.add_argument("--kv-heads", type=int, default=None, help="target key/value heads (GQA families)")
    parser.add_argument("--ffn", type=int, default=None, help="target MLP intermediate size")
    parser.add_argument("--alpha", default="auto",
                        help="weight of the small anchor: a number in [0, 1], 'auto' (by parameter count) "
                             "or a comma-separated per-layer schedule")
    parser.add_argument("--calib", default=None,
                        help="calibration text for importance-based subsetting: a text file, or JSONL with "
                             "'text' or Dolly instruction/response fields")
    parser.add_argument("--layer-subset", choices=LAYER_SUBSET, default=None,
                        help="default: importance with --calib, else uniform")
    parser.add_argument("--layer-expand", choices=LAYER_EXPAND, default="replicate")
    parser.add_argument("--width-subset", choices=WIDTH_SUBSET, default=None,
                        help="default: importance with --calib, else magnitude")
    parser.add_argument("--width-expand", choices=WIDTH_EXPAND, default="zero")
    parser.add_argument("--align", choices=("auto", "on", "off"), default="auto",
                        help="permute the smaller anchor's units to match the larger before blending (cbd_ray.align); "
                             "auto: unless the smaller anchor was pruned from the larger")
    parser.add_argument("--no-align", dest="align", action="store_const", const="off", help="same as --align off")
    parser.add_argument("--name", default=None, help="target name (default: the --out directory's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory made by cbd-ray (never a folder it did not write)")


def parse_alpha(text: str) -> float | str | list[float]:
    """'auto', a number, or a comma-separated per-layer schedule."""
    from cbd_ray.errors import CBDError

    s = text.strip()
    if s == "auto":
        return s
    try:
        if "," in s:
            return [float(x) for x in s.split(",")]
        return float(s)
    except ValueError:
        raise CBDError(f"--alpha {text!r}: expected a number in [0, 1], 'auto' or a comma-separated list") from None


def run(args: argparse.Namespace) -> int:
    from cbd_ray.checks import check_model_dir
    from cbd_ray.interpolate import AnchorPair, ResizeOptions, Shape, load_calib_texts
    from cbd_ray.storage import MODEL_FILES, guard_output

    alpha = parse_alpha(args.alpha)
    # cheap checks first: both anchors opened, the output rule, before tensors are read
    check_model_dir(args.small, "small anchor", tokenizer=False)
    check_model_dir(args.large, "large anchor", tokenizer=False)
    guard_output(args.out, inputs={"small anchor": args.small, "large anchor": args.large, "calibration file": args.calib}, overwrite=args.overwrite,
                 marker=("cbd.json",), own=MODEL_FILES, reuse=True)
    calib = load_calib_texts(args.calib) if args.calib else None
    opts = ResizeOptions(layer_subset=args.layer_subset, layer_expand=args.layer_expand,
                         width_subset=args.width_subset, width_expand=args.width_expand, calib_texts=calib)
    pair = AnchorPair(args.small, args.large, resize=opts, align=args.align)
    s = pair.small_shape
    shape = Shape(
        layers=args.layers if args.layers is not None else s.layers,
        hidden=args.hidden if args.hidden is not None else s.hidden,
        heads=args.heads if args.heads is not None else s.heads,
        kv_heads=args.kv_heads,
        ffn=args.ffn,
    )
    record = pair.make(shape, args.out, alpha=alpha, overwrite=args.overwrite, name=args.name)
    print(json.dumps(record), flush=True)
    return 0

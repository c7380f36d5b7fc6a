"""Interpolation speed and memory at real GPT-2 sizes, beside the cost of just saving the bytes.

Two random GPT-2 anchors of the real sizes (small: 12 layers x 768 x 12 heads, 124M;
medium: 24 x 1024 x 16, 355M; vocabulary 50257, 1024 positions) are built once; a grid of
``--targets`` shapes evenly spaced in parameter count strictly between them is made one
after the other in one process (the per-target figure needs no Ray). Beside it, in a second
process, the same tensors (same names, shapes, dtypes: read back from each target's
safetensors) are filled with random numbers and written with ``safetensors.torch.save_file``
plus an fsync: the floor any writer of that many bytes pays. Each variant runs in its own
subprocess so peak RSS (``ru_maxrss``) is its own.

    python bench/interpolate.py [--targets 8] [--workdir DIR] [--keep]

Goals: seconds per target within 2x of the save floor; peak RSS under 2.5x one large anchor's
file size. Prints one line per target and ends with one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = dict(layers=12, hidden=768, heads=12)   # GPT-2 small, 124M
LARGE = dict(layers=24, hidden=1024, heads=16)  # GPT-2 medium, 355M
VOCAB, POSITIONS = 50257, 1024
GPT2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2_tokenizer"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def worker_anchors(work: Path) -> dict:
    """Build both anchors (reused when already there)."""
    from cbd_ray.storage import atomic_directory
    from cbd_ray.tiny import gpt2_tokenizer, save_tiny_model

    tok = gpt2_tokenizer(GPT2_TOKENIZER) if GPT2_TOKENIZER.is_dir() else None
    for seed, (name, shape) in enumerate((("small", SMALL), ("large", LARGE))):
        d = work / name
        if (d / "config.json").is_file():
            continue
        t = time.perf_counter()
        with atomic_directory(d, overwrite=True) as tmp:  # an interrupted build is not reused
            save_tiny_model(tmp, "gpt2", tokenizer=tok, seed=seed, vocab_size=VOCAB, max_positions=POSITIONS, **shape)
        print(f"anchor {name} {shape} built in {time.perf_counter() - t:.1f}s", flush=True)
    return {}


def worker_ours(work: Path, n: int) -> dict:
    """Make the grid's targets one after the other with one AnchorPair; record each target's
    tensor specs for the floor, then delete it (keeps the disk use to one target)."""
    from safetensors import safe_open

    from cbd_ray.grid import parse_grid, resolve_targets
    from cbd_ray.interpolate import AnchorPair

    t = time.perf_counter()
    pair = AnchorPair(work / "small", work / "large")
    init_s = time.perf_counter() - t
    step = (pair.large_params - pair.small_params) / (n + 1)  # strictly between the anchors
    spec = parse_grid({"params": {"min": pair.small_params + step, "max": pair.large_params - step, "count": n}})
    targets = resolve_targets(spec, pair)
    out = []
    for tg in targets:
        dest = work / "out" / tg.name
        t = time.perf_counter()
        rec = pair.make(tg.shape, dest, alpha="auto", overwrite=True, name=tg.name)
        secs = time.perf_counter() - t
        specs = {}
        for f in sorted(dest.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                specs[f.name] = {k: [list(st.get_slice(k).get_shape()), st.get_slice(k).get_dtype()] for k in st.keys()}
        out.append({"name": tg.name, "shape": rec["shape"] if isinstance(rec["shape"], dict) else str(rec["shape"]),
                    "params": rec["params"], "alpha": rec["alpha"], "seconds": secs, "bytes": _dir_bytes(dest),
                    "specs": specs})
        print(f"  ours  {tg.name:<18} {secs:6.2f}s  rss so far {_peak_rss_mb():.0f} MB", flush=True)
        shutil.rmtree(dest)
    return {"init_s": init_s, "targets": out, "peak_rss_mb": _peak_rss_mb()}


def worker_floor(work: Path, n: int) -> dict:
    """Write each target's tensors (random, same names/shapes/dtypes) with save_file + fsync."""
    import torch
    from safetensors.torch import save_file

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    ours = json.loads((work / "ours.json").read_text())
    out = []
    torch.manual_seed(0)
    for tg in ours["targets"]:
        dest = work / "floor" / tg["name"]
        dest.mkdir(parents=True, exist_ok=True)
        secs = 0.0
        for fname, specs in tg["specs"].items():
            sd = {k: torch.randn(shape).to(dtypes[dt]) if dtypes[dt].is_floating_point else torch.zeros(shape, dtype=dtypes[dt])
                  for k, (shape, dt) in specs.items()}
            t = time.perf_counter()
            save_file(sd, str(dest / fname), metadata={"format": "pt"})
            with open(dest / fname, "rb") as fh:  # ours fsyncs (atomic writes), so the floor does too
                os.fsync(fh.fileno())
            secs += time.perf_counter() - t
            del sd
        out.append({"name": tg["name"], "seconds": secs, "bytes": _dir_bytes(dest)})
        print(f"  floor {tg['name']:<18} {secs:6.2f}s", flush=True)
        shutil.rmtree(dest)
    return {"targets": out, "peak_rss_mb": _peak_rss_mb()}


def run_worker(kind: str, work: Path, n: int) -> dict:
    """Run one variant in a fresh interpreter so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--worker", kind, "--workdir", str(work), "--targets", str(n)]
    subprocess.run(cmd, check=True)
    return json.loads((work / f"{kind}.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=8, help="grid size (default 8)")
    ap.add_argument("--workdir", default=None, help="where anchors and outputs go (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (anchors are reused next time)")
    ap.add_argument("--worker", choices=("anchors", "ours", "floor"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="cbd-bench-interp-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.worker:
        fn = {"anchors": worker_anchors, "ours": worker_ours, "floor": worker_floor}[a.worker]
        res = fn(work) if a.worker == "anchors" else fn(work, a.targets)
        (work / f"{a.worker}.json").write_text(json.dumps(res))
        return
    try:
        print(f"building anchors in {work} (GPT-2 small {SMALL} / medium {LARGE}, vocab {VOCAB})", flush=True)
        run_worker("anchors", work, a.targets)
        large_mb = _dir_bytes(work / "large") / 2**20
        print(f"making {a.targets} targets (one process, sequential)", flush=True)
        ours = run_worker("ours", work, a.targets)
        print("saving the same tensors with safetensors.save_file (the floor)", flush=True)
        floor = run_worker("floor", work, a.targets)
        print(f"{'target':<18} {'shape':<22} {'params':>12} {'MB':>7} {'ours s':>7} {'floor s':>8} {'ratio':>6}")
        for o, f in zip(ours["targets"], floor["targets"]):
            s = o["shape"]
            shape = f"{s['layers']}x{s['hidden']}x{s['heads']} ffn{s.get('ffn')}" if isinstance(s, dict) else s
            print(f"{o['name']:<18} {shape:<22} {o['params']:>12,} {o['bytes'] / 2**20:7.0f} "
                  f"{o['seconds']:7.2f} {f['seconds']:8.2f} {o['seconds'] / f['seconds']:6.2f}")
        n = len(ours["targets"])
        ours_s = sum(o["seconds"] for o in ours["targets"]) / n
        floor_s = sum(f["seconds"] for f in floor["targets"]) / n
        print(json.dumps({
            "bench": "interpolate", "targets": n,
            "ours_s_per_target": round(ours_s, 3), "save_floor_s_per_target": round(floor_s, 3),
            "ratio": round(ours_s / floor_s, 3), "ratio_goal": 2.0,
            "peak_rss_mb": round(ours["peak_rss_mb"]), "large_anchor_mb": round(large_mb),
            "rss_ratio": round(ours["peak_rss_mb"] / large_mb, 3), "rss_ratio_goal": 2.5,
            "floor_peak_rss_mb": round(floor["peak_rss_mb"]), "anchor_pair_init_s": round(ours["init_s"], 3),
            "mean_target_mb": round(sum(o["bytes"] for o in ours["targets"]) / n / 2**20),
            "torch_threads": "default", "cpus": os.cpu_count(),
        }))
    finally:
        if not (a.keep or a.workdir):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

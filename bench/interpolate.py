"""Interpolation speed and memory at real GPT-2 sizes, beside the cost of just saving the bytes.

Two random GPT-2 anchors of the real sizes (small: 12 layers x 768 x 12 heads, 124M;
medium: 24 x 1024 x 16, 355M; vocabulary 50257, 1024 positions) are built once; a grid of
``--targets`` shapes evenly spaced in parameter count strictly between them is made one
after the other by one process holding one AnchorPair (the per-target figure needs no Ray).
Beside it a second process writes the same tensors (same names, shapes, dtypes: read back
from each target's safetensors), filled with random numbers, with
``safetensors.torch.save_file`` plus an fsync: the floor any writer of that many bytes pays.
The two processes take turns target by target, so both see the same machine load, and each
has its own peak RSS (``ru_maxrss``). Wall and CPU seconds are both reported.

    python bench/interpolate.py [--targets 8] [--workdir DIR] [--keep] [--plot FILE.png]

Goals: seconds per target within 2x of the save floor; peak RSS under 2.5x one large anchor's
file size. The first target is reported apart from the rest ("steady state"): it also pays the
pair's one-time work (sha256 of both anchors' weight files, the large anchor's weight-magnitude
scores). The load average is printed with every target (above the CPU count the machine was
shared). Prints one line per target and ends with one JSON line of the figures.
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


def _load() -> str:
    """The 1/5/15-minute load averages: above the CPU count the machine was shared."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def worker_anchors(work: Path) -> None:
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


def _specs(dest: Path) -> dict:
    """{file: {tensor: [shape, dtype]}} of a model directory's safetensors."""
    from safetensors import safe_open

    out = {}
    for f in sorted(dest.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out[f.name] = {k: [list(st.get_slice(k).get_shape()), st.get_slice(k).get_dtype()] for k in st.keys()}
    return out


_REPLIES = None  # a worker's protocol channel: the original stdout (fd 1 then points at stderr)


def _reply(obj: dict) -> None:
    global _REPLIES
    if _REPLIES is None:  # keep stray prints of libraries off the protocol channel
        _REPLIES = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    _REPLIES.write(json.dumps(obj) + "\n")
    _REPLIES.flush()


def worker_ours(work: Path, n: int) -> None:
    """Open the AnchorPair once, announce the grid, then make target i for each line "i" on
    stdin (replying with its figures and tensor specs, then deleting it: disk holds one)."""
    from cbd_ray.grid import parse_grid, resolve_targets
    from cbd_ray.interpolate import AnchorPair

    t = time.perf_counter()
    pair = AnchorPair(work / "small", work / "large")
    init_s = time.perf_counter() - t
    step = (pair.large_params - pair.small_params) / (n + 1)  # strictly between the anchors
    spec = parse_grid({"params": {"min": pair.small_params + step, "max": pair.large_params - step, "count": n}})
    targets = resolve_targets(spec, pair)
    _reply({"init_s": init_s, "targets": [tg.name for tg in targets], "rss_mb": _peak_rss_mb()})
    for line in sys.stdin:
        tg = targets[int(line)]
        dest = work / "out" / tg.name
        t, c = time.perf_counter(), time.process_time()
        rec = pair.make(tg.shape, dest, alpha="auto", overwrite=True, name=tg.name)
        secs, cpu = time.perf_counter() - t, time.process_time() - c
        _reply({"name": tg.name, "shape": rec["shape"], "params": rec["params"], "alpha": rec["alpha"],
                "seconds": secs, "cpu_s": cpu, "bytes": _dir_bytes(dest), "specs": _specs(dest),
                "rss_mb": _peak_rss_mb()})
        shutil.rmtree(dest)


def worker_floor(work: Path, n: int) -> None:
    """For each line of tensor specs on stdin: random tensors of those names, shapes and
    dtypes written with save_file + fsync (timed), then deleted."""
    import torch
    from safetensors.torch import save_file

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    torch.manual_seed(0)
    _reply({"rss_mb": _peak_rss_mb()})
    for line in sys.stdin:
        job = json.loads(line)
        dest = work / "floor" / job["name"]
        dest.mkdir(parents=True, exist_ok=True)
        secs = cpu = 0.0
        for fname, specs in job["specs"].items():
            sd = {k: torch.randn(shape).to(dtypes[dt]) for k, (shape, dt) in specs.items()}
            t, c = time.perf_counter(), time.process_time()
            save_file(sd, str(dest / fname), metadata={"format": "pt"})
            with open(dest / fname, "rb") as fh:  # ours fsyncs (atomic writes), so the floor does too
                os.fsync(fh.fileno())
            secs, cpu = secs + time.perf_counter() - t, cpu + time.process_time() - c
            del sd
        _reply({"name": job["name"], "seconds": secs, "cpu_s": cpu, "bytes": _dir_bytes(dest), "rss_mb": _peak_rss_mb()})
        shutil.rmtree(dest)


def plot(per_target: list, path: str) -> None:
    """Bars of wall and CPU seconds per target, ours beside the save floor.
    ``per_target``: [name, ours_s, floor_s, ours_cpu_s, floor_cpu_s] rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r[0] for r in per_target]
    x = range(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    for ax, (k_ours, k_floor, title) in zip(axes, ((1, 2, "wall seconds"), (3, 4, "CPU seconds"))):
        ax.bar([i - 0.2 for i in x], [r[k_ours] for r in per_target], width=0.4, label="ours (resize + blend + write)")
        ax.bar([i + 0.2 for i in x], [r[k_floor] for r in per_target], width=0.4, label="safetensors save_file + fsync")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{title} per target")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Worker:
    """A variant in its own interpreter (its peak RSS is its own), driven line by line."""

    def __init__(self, kind: str, work: Path, n: int) -> None:
        cmd = [sys.executable, __file__, "--worker", kind, "--workdir", str(work), "--targets", str(n)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench worker exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, msg: str) -> dict:
        self.proc.stdin.write(msg + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=8, help="grid size (default 8)")
    ap.add_argument("--workdir", default=None, help="where anchors and outputs go (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (anchors are reused next time)")
    ap.add_argument("--plot", default=None, help="also draw the per-target seconds into this PNG")
    ap.add_argument("--worker", choices=("anchors", "ours", "floor"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="cbd-bench-interp-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.worker == "anchors":
        worker_anchors(work)
        return
    if a.worker:
        {"ours": worker_ours, "floor": worker_floor}[a.worker](work, a.targets)
        return
    try:
        print(f"building anchors in {work} (GPT-2 small {SMALL} / medium {LARGE}, vocab {VOCAB})", flush=True)
        subprocess.run([sys.executable, __file__, "--worker", "anchors", "--workdir", str(work)], check=True)
        large_mb = _dir_bytes(work / "large") / 2**20
        ours, floor = Worker("ours", work, a.targets), Worker("floor", work, a.targets)
        names = ours.hello["targets"]
        print(f"{len(names)} targets; each made by ours, then the same tensors saved by the floor "
              f"(alternating, so both see the same machine load)", flush=True)
        print(f"AnchorPair opened in {ours.hello['init_s']:.2f}s; load average {_load()} on {os.cpu_count()} CPUs "
              "(the first target also pays the pair's one-time work: hashing both anchors' weight files "
              "and the large anchor's weight-magnitude scores)", flush=True)
        print(f"{'target':<18} {'shape':<20} {'params':>12} {'MB':>6} {'ours s':>7} {'floor s':>8} {'ratio':>6} "
              f"{'ours cpu':>9} {'floor cpu':>9}  load", flush=True)
        rows, loads = [], [os.getloadavg()[0]]
        for i in range(len(names)):
            o = ours.ask(str(i))
            f = floor.ask(json.dumps({"name": o["name"], "specs": o["specs"]}))
            rows.append((o, f))
            loads.append(os.getloadavg()[0])
            s = o["shape"]
            shape = f"{s['layers']}x{s['hidden']}x{s['heads']} ffn{s['ffn']}"
            print(f"{o['name']:<18} {shape:<20} {o['params']:>12,} {o['bytes'] / 2**20:6.0f} {o['seconds']:7.2f} "
                  f"{f['seconds']:8.2f} {o['seconds'] / f['seconds']:6.2f} {o['cpu_s']:9.2f} {f['cpu_s']:9.2f}  "
                  f"{_load()}{'  (first: one-time work)' if i == 0 else ''}", flush=True)
        ours_rss, floor_rss = rows[-1][0]["rss_mb"], rows[-1][1]["rss_mb"]
        ours.close()
        floor.close()
        n = len(rows)
        steady = rows[1:] or rows  # every target after the first: the pair's one-time work is done

        def mean(key: str, k: int, rs: list = rows) -> float:
            return sum(r[k][key] for r in rs) / len(rs)

        def ratios(key: str, rs: list) -> list[float]:
            return sorted(o[key] / f[key] for o, f in rs)

        ours_s, floor_s = mean("seconds", 0), mean("seconds", 1)
        st_o, st_f = mean("seconds", 0, steady), mean("seconds", 1, steady)
        st_r = ratios("seconds", steady)
        summary = {
            "bench": "interpolate", "targets": n,
            "first_ours_s": round(rows[0][0]["seconds"], 3), "first_floor_s": round(rows[0][1]["seconds"], 3),
            "first_ratio": round(rows[0][0]["seconds"] / rows[0][1]["seconds"], 3),
            "first_cpu_ratio": round(rows[0][0]["cpu_s"] / rows[0][1]["cpu_s"], 3),
            "steady_targets": len(steady),
            "steady_ours_s_per_target": round(st_o, 3), "steady_floor_s_per_target": round(st_f, 3),
            "steady_ratio": round(st_o / st_f, 3),
            "steady_ratio_median": round(st_r[len(st_r) // 2] if len(st_r) % 2 else (st_r[len(st_r) // 2 - 1] + st_r[len(st_r) // 2]) / 2, 3),
            "steady_ratio_range": [round(st_r[0], 3), round(st_r[-1], 3)],
            "steady_cpu_ratio": round(mean("cpu_s", 0, steady) / mean("cpu_s", 1, steady), 3),
            "ratio_goal": 2.0,
            "ours_s_per_target": round(ours_s, 3), "save_floor_s_per_target": round(floor_s, 3),
            "ratio": round(ours_s / floor_s, 3),
            "ours_cpu_s_per_target": round(mean("cpu_s", 0), 3), "floor_cpu_s_per_target": round(mean("cpu_s", 1), 3),
            "cpu_ratio": round(mean("cpu_s", 0) / mean("cpu_s", 1), 3),
            "peak_rss_mb": round(ours_rss), "large_anchor_mb": round(large_mb),
            "rss_ratio": round(ours_rss / large_mb, 3), "rss_ratio_goal": 2.5,
            "floor_peak_rss_mb": round(floor_rss), "anchor_pair_init_s": round(ours.hello["init_s"], 3),
            "mean_target_mb": round(sum(o["bytes"] for o, _ in rows) / n / 2**20),
            "torch_threads": "default", "cpus": os.cpu_count(),
            "load_avg_1min": [round(min(loads), 2), round(max(loads), 2)],
            "per_target": [[o["name"], round(o["seconds"], 2), round(f["seconds"], 2), round(o["cpu_s"], 2),
                            round(f["cpu_s"], 2)] for o, f in rows],
        }
        print(f"first target: {summary['first_ratio']:.2f}x the floor (one-time work included); steady state "
              f"({len(steady)} targets): {summary['steady_ratio']:.2f}x (median {summary['steady_ratio_median']:.2f}x, "
              f"range {st_r[0]:.2f}-{st_r[-1]:.2f}x; goal <= 2x); peak RSS {summary['rss_ratio']:.2f}x one large "
              f"anchor (goal < 2.5x); load average {_load()}", flush=True)
        print(json.dumps(summary))
        if a.plot:
            plot([[o["name"], o["seconds"], f["seconds"], o["cpu_s"], f["cpu_s"]] for o, f in rows], a.plot)
    finally:
        if not (a.keep or a.workdir):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

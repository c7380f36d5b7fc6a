"""Helpers shared by the distillation and sampling benchmarks.

Each variant of a benchmark runs in its own subprocess so that its peak memory is its own:
``ru_maxrss`` on CPU (tracemalloc does not see torch's allocator), the CUDA allocator's
``max_memory_allocated`` on GPU. The parent runs the variants one after the other in the
same invocation and prints their ratio.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_shape(text: str) -> dict:
    """``"LAYERSxHIDDEN"`` (heads = hidden / 64, at least 1 and dividing hidden) -> shape kwargs
    for :func:`cbd_ray.tiny.make_tiny_model`."""
    try:
        layers, hidden = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"shape {text!r} is not LAYERSxHIDDEN, e.g. 4x256") from None
    heads = max(1, hidden // 64)
    while hidden % heads:
        heads -= 1
    return dict(layers=layers, hidden=hidden, heads=heads)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: str) -> float:
    """Start a peak-memory window; returns the memory already in use (MiB) for reference."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return peak_rss_mb()


def peak_mb(device: str) -> float:
    """Peak memory since :func:`reset_peak` (CUDA) or of the whole process (CPU), MiB."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_variant(script: Path, variant: str, argv: list[str]) -> dict:
    """Run ``script --variant VARIANT argv...`` in a fresh interpreter; returns its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--variant", variant, "--result", str(out), *argv]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def plot_summary(summary: dict, speed_key: str, speed_label: str, path: str | Path) -> Path:
    """Two bar pairs (speed, peak memory: ours vs baseline) from a bench's JSON summary -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    pairs = [
        (f"ours_{speed_key}", f"baseline_{speed_key}", speed_label, "speed_ratio"),
        ("ours_peak_mb", "baseline_peak_mb", "peak memory (MiB)", "peak_ratio"),
    ]
    for ax, (ours, base, label, ratio) in zip(axes, pairs):
        bars = ax.bar(["baseline", "ours"], [summary[base], summary[ours]], color=["#999999", "#1f77b4"])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(f"{label}: {summary[ratio]:.2f}x")
        ax.margins(y=0.15)
    fig.suptitle(f"{summary['bench']} on {summary['device']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""The grid stage's α search (``grid.alpha: search``).

The chain already holds what Prune and Single start from: blending at α = 0 is the large
anchor resized to the target, at α = 1 the small one. So a target should never start worse
than its own endpoints: each target is blended at a few α values that always include 0 and 1,
every blend is scored on the chain's *validation* text (``data/text_val.txt``; the held-out
text the evaluation reports is never read here), and the lowest loss wins.

Scoring is cbd_ray.finetune.text_loss, the same held-out loss an α trial of
cbd_ray.stages.tune reports before recovery, and the pick is :func:`best_of`, which the Tune
searches use for their trials too, so the two searches rank blends the same way.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cbd_ray.errors import CBDError

VALIDATION_FILE = "text_val.txt"
#: the loss every α search ranks blends by (a Tune trial reports it under this name)
METRIC = "heldout_loss"


def best_of(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The row with the lowest held-out loss among the trials that ran the most iterations
    (ASHA-stopped trials reported earlier, higher losses; they are not compared); ties go to
    the smaller α."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get(METRIC) is not None]
    if not ok:
        raise CBDError("every trial failed: " + "; ".join(str(r.get("error")) for r in rows)[:500])
    most = max(int(r.get("iterations") or 0) for r in ok)
    full = [r for r in ok if int(r.get("iterations") or 0) == most]
    return min(full, key=lambda r: (float(r[METRIC]), float(r["alpha"])))


def with_endpoints(alphas: Sequence[float]) -> list[float]:
    """``alphas`` sorted without repeats, with 0 and 1 added: either anchor as it is stays a
    candidate, so the pick can never be worse than both."""
    return sorted({float(a) for a in alphas} | {0.0, 1.0})


def choose_alpha(alphas: Sequence[float], score: Callable[[float], float]) -> dict[str, Any]:
    """Score every α of ``with_endpoints(alphas)`` and keep the lowest (ties: the smaller α).

    A loss that is not finite counts as +inf, so a diverged blend is never chosen over a
    finite one. Returns {"alphas", "val_losses", "alpha" (chosen), "val_loss"}."""
    grid = with_endpoints(alphas)
    losses = [float(score(a)) for a in grid]
    rows = [{"alpha": a, METRIC: v if math.isfinite(v) else math.inf, "status": "ok", "iterations": 1}
            for a, v in zip(grid, losses)]
    best = best_of(rows)
    return {"alphas": grid, "val_losses": losses, "alpha": float(best["alpha"]), "val_loss": float(best[METRIC])}


def search_alpha(small: Any, large: Any, shape: Mapping[str, Any], alphas: Sequence[float], val_text: str,
                 windows: int = 8, seq_len: int = 128, resize: Any = None, device: str = "cpu") -> dict[str, Any]:
    """Blend one target (``shape``: layers/hidden/heads[/kv_heads/ffn]) between two anchors
    (paths or storage references) at every α and score each on ``val_text``; see
    :func:`choose_alpha` for what is returned. The blends go to a scratch directory that is
    removed afterwards; runs as one Ray task per target in the grid stage."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cbd_ray.devices import resolve
    from cbd_ray.finetune import text_loss
    from cbd_ray.interpolate import AnchorPair, Shape
    from cbd_ray.storage import materialize

    pair = AnchorPair(str(materialize(small)), str(materialize(large)), resize=resize)
    target = Shape(**{k: v for k, v in shape.items() if v is not None})
    dev = resolve(device).torch_device()
    work = Path(tempfile.mkdtemp(prefix="cbd_alpha_search_"))

    def score(a: float) -> float:
        out = work / f"alpha-{a:.4f}"
        try:
            pair.make(target, out, alpha=a, overwrite=True)
            tok = AutoTokenizer.from_pretrained(out)
            model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True, dtype=torch.float32).to(dev)
            return text_loss(model, tok, val_text, seq_len, windows)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    try:
        return choose_alpha(alphas, score)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_validation(data_dir: str | Path) -> str:
    """The chain's validation text (``text_val.txt`` of the data stage); only this file is
    read: the held-out text next to it is what the evaluation reports."""
    path = Path(data_dir) / VALIDATION_FILE
    if not path.is_file():
        raise CBDError(f"grid.alpha: search needs the chain's validation text {path}: set data.val_fraction > 0 "
                       "and rerun the data stage")
    return path.read_text()


__all__ = ["METRIC", "best_of", "choose_alpha", "search_alpha", "read_validation", "with_endpoints", "VALIDATION_FILE"]

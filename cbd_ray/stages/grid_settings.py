"""What the chain config's ``grid`` section becomes for the engines, shared by every stage
that makes targets (grid, baselines, the Tune searches).

* :func:`resize_options`: ``grid.resize`` as :class:`cbd_ray.resize.ResizeOptions`, with
  calibration text from the run's ``data/train.jsonl`` when ``grid.resize.calib`` is set.
* The α file: the Tune α search (cbd_ray.stages.tune) writes the best α per target to
  ``<run>/tune/best_alpha.json``; ``grid.alpha: best`` reads it back
  (:func:`with_searched_alpha`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from cbd_ray.errors import CBDError
from cbd_ray.schema import ChainConfig
from cbd_ray.stages.data import read_jsonl

logger = logging.getLogger(__name__)

#: the α search's result in ``<run>/tune/``: {target name: α}
BEST_ALPHA = "best_alpha.json"
#: calibration records (of data/train.jsonl) when grid.resize.calib is set
CALIB_RECORDS = 32


def resize_options(cfg: ChainConfig, data_dir: str | os.PathLike) -> Any:
    """``cfg.grid.resize`` as ResizeOptions; ``data_dir`` is the run's data stage directory."""
    from cbd_ray.resize import ResizeOptions

    r = cfg.grid.resize.model_dump()
    calib = r.pop("calib")
    allowed = {f.name for f in dataclasses.fields(ResizeOptions)}
    kw = {k: v for k, v in r.items() if k in allowed}
    if calib and "calib_texts" in allowed:
        recs = read_jsonl(Path(data_dir) / "train.jsonl")[:CALIB_RECORDS]
        kw["calib_texts"] = [f"{x['instruction']}\n{x['response']}" for x in recs]
    return ResizeOptions(**kw)


def load_best_alpha(run_dir: str | os.PathLike) -> dict[str, float]:
    """{target name: α} from ``<run>/tune/best_alpha.json`` ({} when no search has run)."""
    p = Path(run_dir) / "tune" / BEST_ALPHA
    if not p.is_file():
        return {}
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in data.values()):
        raise CBDError(f"{p} must map target names to α in [0, 1]; got {str(data)[:200]}")
    return {str(k): float(v) for k, v in data.items()}


def apply_best_alpha(cfg: Any, run_dir: str | os.PathLike) -> Any:
    """A copy of the chain config ``cfg`` whose grid targets without an explicit α take the
    searched one (so the grid stage, whose hash covers the grid, redoes those targets)."""
    best = load_best_alpha(run_dir)
    if not best:
        return cfg
    targets = [t.model_copy(update={"alpha": best[t.label]}) if t.alpha is None and t.label in best else t
               for t in cfg.grid.targets]
    return cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"targets": targets})})


def _say(s: str) -> None:
    logger.info("%s", s)


def with_searched_alpha(cfg: ChainConfig, run_dir: Path, log: Callable[[str], None] = _say) -> ChainConfig:
    """``grid.alpha: best``: grid targets without their own α take the one the α search wrote
    to ``<run>/tune/best_alpha.json``; the others (and all when no search ran) use "auto".
    The grid stage's hash covers the targets, so a new search result redoes the grid."""
    searched = load_best_alpha(run_dir)
    used = [t.label for t in cfg.grid.targets if t.alpha is None and t.label in searched]
    log(f"grid α: searched α for {', '.join(used) or 'no target'} (tune/best_alpha.json); auto for the rest")
    cfg = apply_best_alpha(cfg, run_dir)
    return cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"alpha": "auto"})})

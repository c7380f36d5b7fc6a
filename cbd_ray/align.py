"""Aligned blending: permute the smaller anchor's units to match the larger one.

Two anchors trained apart (public checkpoints, or ``init: random``) order their hidden
channels, attention heads and FFN neurons arbitrarily, so blending their weights position by
position mixes unrelated features. Git Re-Basin's weight matching (Ainsworth et al., 2023)
fixes that: find the permutation of one model's units that makes its weights most similar to
the other's, by solving an assignment problem (``scipy.optimize.linear_sum_assignment``), and
apply it. A permutation applied consistently to every tensor changes no function: LayerNorm
and RMSNorm are permutation-equivariant over channels, heads (with their Q/K/V/O slices, whole
GQA groups together) and FFN neurons (in and out) may be reordered freely.

Here the smaller anchor is matched to the *larger anchor resized to the target*
(cbd_ray.resize), on the slots where the expanded small anchor lands: small unit i is
zero-padded into target slot i, so small unit i should hold what T(large) holds in slot i.
Matching goes axis by axis, each step using the previous ones:

1. hidden channels: columns of the token (and position) embeddings, correlation;
2. heads per small layer, against the target layer that small layer first fills: the head's
   Q/K/V rows and O columns over the matched hidden channels (GQA: a kv group with its query
   heads moves as one unit);
3. FFN neurons per small layer: the neuron's input rows, bias and output columns.

The permuted model is written by the same streaming writer as any resized model (the plan is a
:class:`cbd_ray.resize.ResizePlan` whose maps are permutations), so every family's layout table
(cbd_ray/arch) is honoured, packed Q/K/V included.

``lineage.json`` beside an anchor's weights records whom it descends from (written by the
chain for ``init: prune`` anchors): ``align: auto`` aligns only pairs where the small anchor
does not descend from the large one, since a pruned descendant already shares its parent's
channel order.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

from cbd_ray.arch import Shape, TensorSpec
from cbd_ray.errors import CBDError
from cbd_ray.resize import AxisMap, Checkpoint, ResizeOptions, ResizePlan, Scorer, plan_resize, resize_tensor

log = logging.getLogger(__name__)

AlignMode = Literal["auto", "on", "off"]
ALIGN_MODES = ("auto", "on", "off")
LINEAGE = "lineage.json"


# --------------------------------------------------------------------------- lineage


def weights_digest(model_dir: str | os.PathLike) -> str:
    """One sha256 over a model's weight files (their names and checksums)."""
    from cbd_ray.schema import config_hash

    return config_hash(Checkpoint(model_dir).checksums)


def write_lineage(model_out: str | os.PathLike, student_dir: str | os.PathLike) -> Path:
    """Record in ``model_out/lineage.json`` that the model there descends (by pruning) from
    the model in ``student_dir``: the digest of its weights and of all its own ancestors."""
    from cbd_ray.storage import atomic_write_json

    parent = Path(student_dir)
    old = parent / LINEAGE
    ancestors = json.loads(old.read_text()).get("ancestors", []) if old.is_file() else []
    out = Path(model_out) / LINEAGE
    atomic_write_json(out, {"init": "prune", "parent": str(parent.name),
                            "ancestors": [weights_digest(parent), *ancestors]})
    return out


def descends_from(small_dir: str | os.PathLike, large_dir: str | os.PathLike) -> bool:
    """Whether the model in ``small_dir`` was pruned (directly or through its ancestors)
    from the one in ``large_dir``, by the record in ``small_dir/lineage.json``."""
    p = Path(small_dir) / LINEAGE
    if not p.is_file():
        return False
    return weights_digest(large_dir) in json.loads(p.read_text()).get("ancestors", [])


def resolve_align(mode: str, small_dir: str | os.PathLike, large_dir: str | os.PathLike) -> bool:
    """``on``/``off`` as given; ``auto``: on unless the small anchor descends from the large."""
    if mode not in ALIGN_MODES:
        raise CBDError(f"align={mode!r} is not one of {', '.join(ALIGN_MODES)}")
    if mode == "auto":
        return not descends_from(small_dir, large_dir)
    return mode == "on"


# --------------------------------------------------------------------------- unit features


def _unit_rows(t: torch.Tensor, spec: TensorSpec, dim: int, n_units: int, keep: int, hd: int, group: int) -> torch.Tensor:
    """The first ``keep`` units of ``t`` along ``dim`` as rows [keep, features].

    A unit is one hidden channel or FFN neuron (``hd`` = 1, ``group`` = 1), or one attention
    unit: a head (GPT-2's fused [Q | K | V] columns: its three slices; GPT-NeoX's interleaved
    rows: its 3 x head_dim block) or, with grouped-query attention, a kv group (its kv head,
    or the ``group`` query heads that share it)."""
    x = t.movedim(dim, 0)
    if spec.packing == "qkv_fused_conv1d":
        x = x.reshape(3, n_units, hd, -1)[:, :keep].transpose(0, 1)
    elif spec.packing == "qkv_interleaved":
        x = x.reshape(n_units, 3 * hd, -1)[:keep]
    else:
        x = x.reshape(n_units, group * hd, -1)[:keep]
    return x.reshape(keep, -1)


def _narrow_hidden(t: torch.Tensor, spec: TensorSpec, keep: int, skip: int) -> torch.Tensor:
    """``t`` with every hidden axis but ``skip`` cut to its first ``keep`` channels (the
    slots the expanded small anchor fills)."""
    for d, role in enumerate(spec.axes):
        if role == "hidden" and d != skip and t.shape[d] > keep:
            t = t.narrow(d, 0, keep)
    return t


def _normalised(rows: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-tensor unit features (each scaled to unit RMS so no tensor dominates),
    then centre and L2-normalise every unit's vector: a dot product is a correlation."""
    parts = [r.double() / (r.double().pow(2).mean().sqrt() + 1e-12) for r in rows]
    x = torch.cat(parts, dim=1)
    x = x - x.mean(dim=1, keepdim=True)
    return x / (x.norm(dim=1, keepdim=True) + 1e-12)


def _match(small: torch.Tensor, large: torch.Tensor) -> tuple[list[int], float, float]:
    """Assignment maximising the summed correlation of small unit ``index[k]`` with large
    slot k; returns (index, mean correlation before, after)."""
    from scipy.optimize import linear_sum_assignment

    sim = small @ large.T  # [small units, large slots]
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    index = [0] * len(cols)
    for r, c in zip(rows, cols):
        index[int(c)] = int(r)
    before = float(sim.diagonal().mean())
    after = float(sim[torch.tensor(index), torch.arange(len(index))].mean())
    return index, before, after


# --------------------------------------------------------------------------- matching


class _Sides:
    """The small anchor (with the permutations found so far applied) and the large anchor
    resized to the target, tensor by tensor."""

    def __init__(self, small: Checkpoint, large_scorer: Scorer, target: Shape, options: ResizeOptions) -> None:
        self.small, self.large = small, large_scorer.ckpt
        self.hd = small.adapter.head_dim
        self.large_plan = plan_resize(large_scorer, target, options)
        self.target = target
        n = small.shape
        self.hidden = AxisMap(tuple(range(n.hidden)), n.hidden)

    def small_t(self, spec: TensorSpec, layer: int | None) -> torch.Tensor:
        s = self.small.shape
        ident = [AxisMap(tuple(range(k)), k) for k in (s.heads, s.kv_heads or s.heads, s.ffn)]
        plan = ResizePlan(s, s, [(i, False) for i in range(s.layers)], self.hidden, [ident[0]] * s.layers,
                          [ident[1]] * s.layers, [ident[2]] * s.layers)
        return resize_tensor(self.small.tensor(spec, layer), spec, plan, layer, self.hd)

    def large_t(self, spec: TensorSpec, layer: int | None) -> torch.Tensor:
        src = self.large_plan.layers[layer][0] if layer is not None else None
        return resize_tensor(self.large.tensor(spec, src), spec, self.large_plan, layer, self.hd)


def _hidden(sides: _Sides) -> tuple[list[int], float, float]:
    """Hidden channels, matched on the embedding tables (and untied LM head, final norm)."""
    n = sides.small.shape.hidden
    S, L = [], []
    for spec in sides.small.adapter.stored():
        if spec.per_layer or "hidden" not in spec.axes or any(r not in ("hidden", "vocab", "positions")
                                                                for r in spec.axes):
            continue
        d = spec.axes.index("hidden")
        S.append(_unit_rows(sides.small_t(spec, None), spec, d, n, n, 1, 1))
        lt = sides.large_t(spec, None)
        L.append(_unit_rows(lt, spec, d, lt.shape[d], n, 1, 1))
    return _match(_normalised(S), _normalised(L))


def _layer_units(sides: _Sides, layer: int, tlayer: int, roles: tuple[str, ...], n_small: int, n_large: int,
                 hd: int, group: int) -> tuple[list[int], float, float] | None:
    """Heads (``roles`` heads/kv_heads) or FFN neurons of small layer ``layer`` matched to
    the large anchor's target layer ``tlayer``."""
    keep = sides.small.shape.hidden
    S, L = [], []
    for spec in sides.small.adapter.stored():
        if not spec.per_layer:
            continue
        dims = [d for d, r in enumerate(spec.axes) if r in roles]
        if not dims:
            continue
        d = dims[0]
        g = group if spec.axes[d] == "heads" else 1
        S.append(_unit_rows(sides.small_t(spec, layer), spec, d, n_small, n_small, hd, g))
        lt = _narrow_hidden(sides.large_t(spec, tlayer), spec, keep, d)
        L.append(_unit_rows(lt, spec, d, n_large, n_small, hd, g))
    return _match(_normalised(S), _normalised(L)) if S else None


def _axes_fit(small: Shape, target: Shape) -> str | None:
    """Why the small anchor cannot be aligned to ``target`` (None when it can): it must be
    expanded, never cut, on every width axis, so its unit i lands in target slot i."""
    for ax in ("hidden", "heads", "kv_heads", "ffn"):
        a, b = getattr(small, ax), getattr(target, ax)
        if a is not None and b is not None and a > b:
            return f"the small anchor's {ax}={a} exceeds the target's {b}"
    return None


def alignment_plan(small: Checkpoint, small_scorer: Scorer, large_scorer: Scorer, target: Shape,
                   options: ResizeOptions) -> tuple[ResizePlan | None, dict[str, Any]]:
    """The permutation plan (source = target = the small anchor's shape) that aligns the
    small anchor to the large one resized to ``target``, and its record: per axis the mean
    correlation of the matched units before (identity) and after, and how many moved."""
    why = _axes_fit(small.shape, target)
    if why:
        return None, {"applied": False, "reason": why}
    s, a = small.shape, small.adapter
    sides = _Sides(small, large_scorer, target, options)
    h, hb, ha = _hidden(sides)
    sides.hidden = AxisMap(tuple(h), s.hidden)
    rec: dict[str, Any] = {"applied": True, "method": "weight matching (linear_sum_assignment)",
                           "hidden": {"moved": sum(i != k for k, i in enumerate(h)), "corr_before": hb, "corr_after": ha}}
    kv_s, kv_t = s.kv_heads or s.heads, target.kv_heads or target.heads
    g = s.heads // kv_s if a.has_gqa else 1
    heads_ok = not a.has_gqa or g == target.heads // kv_t
    first = {}
    for j, (src, _) in enumerate(plan_resize(small_scorer, target, options).layers):
        first.setdefault(src, j)
    qs, kvs, fs, stats = [], [], [], {"heads": [], "ffn": []}
    for layer in range(s.layers):
        j = first.get(layer, layer)
        n_units = kv_s if a.has_gqa else s.heads
        m = _layer_units(sides, layer, j, ("heads", "kv_heads"), n_units, kv_t if a.has_gqa else target.heads,
                         sides.hd, g) if heads_ok else None
        idx = m[0] if m else list(range(n_units))
        kvs.append(AxisMap(tuple(idx), n_units))
        qs.append(AxisMap(tuple(k * g + i for k in idx for i in range(g)), s.heads) if a.has_gqa else kvs[-1])
        f = _layer_units(sides, layer, j, ("ffn",), s.ffn, target.ffn or 4 * target.hidden, 1, 1)
        fs.append(AxisMap(tuple(f[0]), s.ffn))
        for key, res in (("heads", m), ("ffn", f)):
            if res:
                stats[key].append((sum(i != k for k, i in enumerate(res[0])), res[1], res[2]))
    for key, rows in stats.items():
        rec[key] = {"moved": sum(r[0] for r in rows), "corr_before": sum(r[1] for r in rows) / len(rows),
                    "corr_after": sum(r[2] for r in rows) / len(rows)} if rows else {"moved": 0, "skipped":
                    "query heads per kv head differ between the small anchor and the target"}
    plan = ResizePlan(s, s, [(i, False) for i in range(s.layers)], sides.hidden, qs, kvs, fs, tied=a.tied)
    return plan, rec


def write_aligned(small: Checkpoint, plan: ResizePlan, out_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write the small anchor permuted by ``plan`` (same shape, same function) to ``out_dir``."""
    from cbd_ray.interpolate import _write_model

    out = Path(out_dir)
    ref = {"path": str(small.path.resolve()), "shape": small.shape.as_dict(), "params": small.params,
           "weights": small.checksums}
    meta = {"family": small.config.architectures[0], "name": out.name, "target": small.shape.as_dict(),
            "alpha": 1.0, "params": small.params, "resize": ResizeOptions(width_subset="first").describe(),
            "anchors": {"small": ref, "large": ref}, "align": record}
    _write_model(out, small.shape, [small, small], [plan, None], [1.0] * small.shape.layers, 1.0, True, lambda: meta)
    return out


def align_to(small_dir: str | os.PathLike, large_dir: str | os.PathLike, target: Shape | None, out_dir: str | os.PathLike,
             options: ResizeOptions | None = None) -> dict[str, Any]:
    """One call: permute the anchor in ``small_dir`` to match the one in ``large_dir``
    resized to ``target`` (default: the small anchor's own shape) and write it to
    ``out_dir``; returns the record (also in ``out_dir/cbd.json`` under ``align``)."""
    from cbd_ray.resize import calib_blocks

    opts = (options or ResizeOptions()).resolved()
    small, large = Checkpoint(small_dir), Checkpoint(large_dir)
    blocks = calib_blocks(small.load_tokenizer(), opts.calib_texts) if opts.calib_texts else None
    plan, rec = alignment_plan(small, Scorer(small, blocks), Scorer(large, blocks), target or small.shape, opts)
    if plan is None:
        raise CBDError(f"cannot align {small_dir} to {large_dir}: {rec['reason']}")
    write_aligned(small, plan, out_dir, rec)
    return rec

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
from cbd_ray.config import config_hash
from cbd_ray.errors import CBDError
from cbd_ray.model_writer import write_model
from cbd_ray.resize import (AxisMap, Checkpoint, ResizeOptions, ResizePlan, Scorer, calib_blocks, plan_resize,
                            resize_tensor)
from cbd_ray.storage import atomic_write_json

log = logging.getLogger(__name__)

AlignMode = Literal["auto", "on", "off"]
ALIGN_MODES = ("auto", "on", "off")
LINEAGE = "lineage.json"


# --------------------------------------------------------------------------- lineage


def weights_digest(model_dir: str | os.PathLike) -> str:
    """One sha256 over a model's weight files (their names and checksums)."""
    return config_hash(Checkpoint(model_dir).checksums)


def write_lineage(model_out: str | os.PathLike, student_dir: str | os.PathLike) -> Path:
    """Record in ``model_out/lineage.json`` that the model there descends (by pruning) from
    the model in ``student_dir``: the digest of its weights and of all its own ancestors."""
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


def _take_hidden(t: torch.Tensor, spec: TensorSpec, slots: list[int], skip: int) -> torch.Tensor:
    """``t`` with every hidden axis but ``skip`` reduced to the target ``slots`` the small
    anchor's (already matched) hidden channels will occupy, in the small anchor's order."""
    idx = torch.tensor(slots, dtype=torch.long)
    for d, role in enumerate(spec.axes):
        if role == "hidden" and d != skip:
            t = t.index_select(d, idx)
    return t


def _normalised(rows: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-tensor unit features (each scaled to unit RMS so no tensor dominates),
    then centre and L2-normalise every unit's vector: a dot product is a correlation."""
    parts = [r.double() / (r.double().pow(2).mean().sqrt() + 1e-12) for r in rows]
    x = torch.cat(parts, dim=1)
    x = x - x.mean(dim=1, keepdim=True)
    return x / (x.norm(dim=1, keepdim=True) + 1e-12)


class Matched:
    """The assignment of ``n`` small units to ``n_slots`` target slots (n <= n_slots).

    ``order[k]``: the small unit that becomes unit k of the aligned (permuted) small anchor;
    ``slots[k]``: the target slot unit k fills (ascending), so the aligned anchor expands by
    placing its units there and zeros elsewhere instead of zero padding at the end."""

    def __init__(self, slot_of: list[int], n_slots: int, before: float, after: float) -> None:
        self.order = sorted(range(len(slot_of)), key=lambda i: slot_of[i])
        self.slots = [slot_of[i] for i in self.order]
        self.n_slots = n_slots
        self.before, self.after = before, after

    @classmethod
    def identity(cls, n: int, n_slots: int) -> "Matched":
        return cls(list(range(n)), n_slots, float("nan"), float("nan"))

    def moved(self) -> int:
        return sum(s != k for k, s in enumerate(self.slots))

    def expansion(self, unit_rows: int = 1, group: int = 1) -> AxisMap:
        """Target slot -> aligned small unit (or -1), with each slot spanning ``group`` units."""
        index = [-1] * (self.n_slots * group)
        for k, slot in enumerate(self.slots):
            for i in range(group):
                index[slot * group + i] = k * group + i
        return AxisMap(tuple(index), len(self.slots) * group)

    def record(self) -> dict[str, Any]:
        return {"moved": self.moved(), "corr_before": self.before, "corr_after": self.after}


def _match(small: torch.Tensor, large: torch.Tensor) -> Matched:
    """Rectangular assignment maximising the summed correlation of every small unit with a
    distinct large slot; "before" is the plain blend's placement (unit i in slot i)."""
    from scipy.optimize import linear_sum_assignment

    sim = small @ large.T  # [small units, large slots]
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    slot_of = [0] * small.shape[0]
    for r, c in zip(rows, cols):
        slot_of[int(r)] = int(c)
    n = small.shape[0]
    before = float(sim[torch.arange(n), torch.arange(n)].mean())
    after = float(sim[torch.arange(n), torch.tensor(slot_of)].mean())
    return Matched(slot_of, large.shape[0], before, after)


# --------------------------------------------------------------------------- matching


class _Sides:
    """The small anchor (with the hidden permutation found so far applied) and the large
    anchor resized to the target, tensor by tensor."""

    def __init__(self, small: Checkpoint, large_scorer: Scorer, target: Shape, options: ResizeOptions) -> None:
        self.small, self.large = small, large_scorer.ckpt
        self.hd = small.adapter.head_dim
        self.large_plan = plan_resize(large_scorer, target, options)
        self.hidden = Matched.identity(small.shape.hidden, target.hidden)

    def small_t(self, spec: TensorSpec, layer: int | None) -> torch.Tensor:
        s = self.small.shape
        ident = [AxisMap(tuple(range(k)), k) for k in (s.heads, s.kv_heads or s.heads, s.ffn)]
        plan = ResizePlan(s, s, [(i, False) for i in range(s.layers)], AxisMap(tuple(self.hidden.order), s.hidden),
                          [ident[0]] * s.layers, [ident[1]] * s.layers, [ident[2]] * s.layers)
        return resize_tensor(self.small.tensor(spec, layer), spec, plan, layer, self.hd)

    def large_t(self, spec: TensorSpec, layer: int | None) -> torch.Tensor:
        src = self.large_plan.layers[layer][0] if layer is not None else None
        return resize_tensor(self.large.tensor(spec, src), spec, self.large_plan, layer, self.hd)


def _hidden(sides: _Sides) -> Matched:
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
        L.append(_unit_rows(lt, spec, d, lt.shape[d], lt.shape[d], 1, 1))
    return _match(_normalised(S), _normalised(L))


def _layer_units(sides: _Sides, layer: int, tlayer: int, roles: tuple[str, ...], n_small: int, n_large: int,
                 hd: int, group: int) -> Matched | None:
    """Heads (``roles`` heads/kv_heads) or FFN neurons of small layer ``layer`` matched to
    the large anchor's target layer ``tlayer``, over the hidden slots already matched."""
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
        lt = _take_hidden(sides.large_t(spec, tlayer), spec, sides.hidden.slots, d)
        L.append(_unit_rows(lt, spec, d, n_large, n_large, hd, g))
    return _match(_normalised(S), _normalised(L)) if S else None


def _axes_fit(small: Shape, target: Shape, options: ResizeOptions) -> str | None:
    """Why the small anchor cannot be aligned to ``target`` (None when it can): it must be
    expanded by zero padding, never cut, on every width axis."""
    if options.width_expand != "zero":
        return f"width_expand={options.width_expand!r}: alignment places units for zero padding only"
    for ax in ("hidden", "heads", "kv_heads", "ffn"):
        a, b = getattr(small, ax), getattr(target, ax)
        if a is not None and b is not None and a > b:
            return f"the small anchor's {ax}={a} exceeds the target's {b}"
    return None


class Alignment:
    """Per axis the :class:`Matched` assignment; :meth:`permutation` is the plan that
    reorders the small anchor (same shape, same function) and :meth:`expand` turns the
    resize plan of the reordered anchor into one that places its units at the matched slots."""

    def __init__(self, small: Shape, gqa: bool, group: int, hidden: Matched, units: list[tuple[Matched, Matched]],
                 tied: bool) -> None:
        self.small, self.gqa, self.group, self.hidden, self.units, self.tied = small, gqa, group, hidden, units, tied

    def _q(self, kv: list[int]) -> tuple[int, ...]:
        return tuple(k * self.group + i for k in kv for i in range(self.group)) if self.gqa else tuple(kv)

    def permutation(self) -> ResizePlan:
        s = self.small
        kvs = [AxisMap(tuple(h.order), len(h.order)) for h, _ in self.units]
        qs = [AxisMap(self._q(h.order), s.heads) if self.gqa else kv for (h, _), kv in zip(self.units, kvs)]
        fs = [AxisMap(tuple(f.order), s.ffn) for _, f in self.units]
        return ResizePlan(s, s, [(i, False) for i in range(s.layers)], AxisMap(tuple(self.hidden.order), s.hidden),
                          qs, kvs, fs, tied=self.tied)

    def expand(self, plan: ResizePlan) -> ResizePlan:
        """``plan`` (the reordered small anchor to the target) with every width map scattered."""
        import dataclasses

        heads, kvs, ffns = [], [], []
        for src, _ in plan.layers:
            h, f = self.units[src]
            kv = h.expansion()
            kvs.append(kv)
            heads.append(h.expansion(group=self.group) if self.gqa else kv)
            ffns.append(f.expansion())
        return dataclasses.replace(plan, hidden=self.hidden.expansion(), heads=heads, kv_heads=kvs, ffn=ffns)

    def record(self) -> dict[str, Any]:
        def agg(ms: list[Matched]) -> dict[str, Any]:
            return {"moved": sum(m.moved() for m in ms), "corr_before": sum(m.before for m in ms) / len(ms),
                    "corr_after": sum(m.after for m in ms) / len(ms)}

        return {"applied": True, "method": "weight matching, rectangular linear_sum_assignment",
                "hidden": self.hidden.record(), "heads": agg([h for h, _ in self.units]),
                "ffn": agg([f for _, f in self.units])}


def alignment_plan(small: Checkpoint, small_scorer: Scorer, large_scorer: Scorer, target: Shape,
                   options: ResizeOptions) -> tuple[Alignment | None, dict[str, Any]]:
    """The alignment of the small anchor to the large one resized to ``target`` (None, and
    the reason, when it cannot be aligned), and its record for cbd.json: per axis how many
    units moved and the mean correlation of each small unit with its slot before (the plain
    blend: unit i in slot i) and after."""
    why = _axes_fit(small.shape, target, options)
    kv_s, kv_t = small.shape.kv_heads or small.shape.heads, target.kv_heads or target.heads
    gqa = small.adapter.has_gqa
    g = small.shape.heads // kv_s if gqa else 1
    if gqa and g != target.heads // kv_t:
        why = why or "query heads per kv head differ between the small anchor and the target"
    if why:
        return None, {"applied": False, "reason": why}
    s = small.shape
    sides = _Sides(small, large_scorer, target, options)
    sides.hidden = _hidden(sides)
    first: dict[int, int] = {}
    for j, (src, _) in enumerate(plan_resize(small_scorer, target, options).layers):
        first.setdefault(src, j)
    units = []
    for layer in range(s.layers):
        j = first.get(layer, layer)
        h = _layer_units(sides, layer, j, ("heads", "kv_heads"), kv_s if gqa else s.heads,
                         kv_t if gqa else target.heads, sides.hd, g)
        f = _layer_units(sides, layer, j, ("ffn",), s.ffn, target.ffn or 4 * target.hidden, 1, 1)
        units.append((h, f))
    al = Alignment(s, gqa, g, sides.hidden, units, small.adapter.tied)
    return al, al.record()


def write_aligned(small: Checkpoint, plan: ResizePlan, out_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write the small anchor permuted by ``plan`` (same shape, same function) to ``out_dir``."""
    out = Path(out_dir)
    ref = {"path": str(small.path.resolve()), "shape": small.shape.as_dict(), "params": small.params,
           "weights": small.checksums}
    meta = {"family": small.config.architectures[0], "name": out.name, "target": small.shape.as_dict(),
            "alpha": 1.0, "params": small.params, "resize": ResizeOptions(width_subset="first").describe(),
            "anchors": {"small": ref, "large": ref}, "align": record}
    write_model(out, small.shape, [small, small], [plan, None], [1.0] * small.shape.layers, 1.0, True, lambda: meta)
    return out


def align_to(small_dir: str | os.PathLike, large_dir: str | os.PathLike, target: Shape | None, out_dir: str | os.PathLike,
             options: ResizeOptions | None = None) -> dict[str, Any]:
    """One call: permute the anchor in ``small_dir`` to match the one in ``large_dir``
    resized to ``target`` (default: the small anchor's own shape) and write it to
    ``out_dir``; returns the record (also in ``out_dir/cbd.json`` under ``align``)."""
    opts = (options or ResizeOptions()).resolved()
    small, large = Checkpoint(small_dir), Checkpoint(large_dir)
    blocks = calib_blocks(small.load_tokenizer(), opts.calib_texts) if opts.calib_texts else None
    al, rec = alignment_plan(small, Scorer(small, blocks), Scorer(large, blocks), target or small.shape, opts)
    if al is None:
        raise CBDError(f"cannot align {small_dir} to {large_dir}: {rec['reason']}")
    write_aligned(small, al.permutation(), out_dir, rec)
    return rec

"""Interpolation: a model of any shape between two anchors of one family.

Both anchors are resized to the target shape (:mod:`cbd_ray.resize`: the smaller one is
expanded, the larger one subset, axis by axis) and blended tensor by tensor::

    θ_target = α · T(θ_small) + (1 − α) · T(θ_large)

α is a number in [0, 1], ``"auto"`` = (P_large − P_target) / (P_large − P_small) by
parameter count (clipped to [0, 1]), or a per-layer schedule (a list with one α per
target layer; tensors outside the layers take the schedule's mean). α = 1 returns the
resized small anchor and α = 0 the resized large anchor bit for bit (no arithmetic).

Tensors are read one at a time from lazily opened safetensors and streamed into the
output file, so memory stays near one tensor of each anchor plus the current output
tensor, never three models. The output directory is written with
:func:`cbd_ray.storage.atomic_directory`: a crash leaves nothing that looks whole.

The output directory holds ``config.json`` (``from_pretrained``-loadable), ``model.safetensors``
(shards and an index above ``cbd_ray.model_writer.MAX_SHARD_BYTES``),
``generation_config.json`` when the small anchor has one, the small anchor's tokenizer
files, ``cbd.json`` (provenance: anchors with the sha256 of their weight files, target
shape, α, resize choices, parameter count, cbd_ray version) and a short ``README.md``.

Making the same target again into a directory whose ``cbd.json`` records the same anchors
(by hash), shape, α and resize choices, and whose files all match the sha256 recorded in
that ``cbd.json``, is a no-op that returns the existing record with ``"reused": true``; a
damaged copy (a truncated weight file) is rebuilt. The output follows the project's one rule
(:func:`cbd_ray.storage.guard_output`): never an anchor, inside one or containing one; a
directory cbd-ray did not write is never replaced; another target's directory only with
``overwrite=True``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cbd_ray.align import ALIGN_MODES, alignment_plan, resolve_align, write_aligned
from cbd_ray.arch import Shape
from cbd_ray.errors import CBDError, IncompatibleModelsError
from cbd_ray.model_writer import write_model
from cbd_ray.resize import Checkpoint, ResizeOptions, ResizePlan, Scorer, calib_blocks, engine_threads, plan_resize
from cbd_ray.storage import MODEL_FILES, guard_output

__all__ = ["Shape", "ResizeOptions", "AnchorPair", "TargetRules", "interpolate", "resize_model", "parse_shape",
           "load_calib_texts"]

log = logging.getLogger(__name__)

Alpha = float | str | Sequence[float]


# --------------------------------------------------------------------------- shapes


def parse_shape(spec: str | dict | Shape) -> Shape:
    """A Shape from ``"14x768x12"`` (layers x hidden x heads [x kv_heads [x ffn]]),
    ``"layers=14,hidden=768,heads=12[,kv_heads=4,ffn=3072]"`` or a mapping of those keys."""
    if isinstance(spec, Shape):
        return spec
    fields = ("layers", "hidden", "heads", "kv_heads", "ffn")
    if isinstance(spec, str):
        s = spec.strip()
        if "=" in s:
            d: dict[str, Any] = {}
            for part in s.split(","):
                k, _, v = part.partition("=")
                d[k.strip()] = v.strip()
        else:
            parts = s.lower().split("x")
            if not 3 <= len(parts) <= 5:
                raise CBDError(f"shape {spec!r}: expected LAYERSxHIDDENxHEADS[xKV_HEADS[xFFN]] or key=value pairs")
            d = dict(zip(fields, parts))
    elif isinstance(spec, dict):
        d = dict(spec)
    else:
        raise CBDError(f"shape {spec!r} is not a string or mapping")
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise CBDError(f"shape {spec!r}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    missing = [k for k in fields[:3] if d.get(k) in (None, "")]
    if missing:
        raise CBDError(f"shape {spec!r}: missing {', '.join(missing)}")
    out: dict[str, int | None] = {}
    for k in fields:
        v = d.get(k)
        if v is None or v == "":
            out[k] = None
            continue
        try:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            out[k] = int(v)
        except (TypeError, ValueError):
            raise CBDError(f"shape {spec!r}: {k}={v!r} is not an integer") from None
        if out[k] < 1:
            raise CBDError(f"shape {spec!r}: {k}={v} must be positive")
    return Shape(**out)  # type: ignore[arg-type]


def load_calib_texts(path: str | os.PathLike, limit: int = 256) -> list[str]:
    """Calibration texts from a file: JSONL (field ``text``, or Dolly's instruction/context/
    response joined) or plain text (split at blank lines). At most ``limit`` texts."""
    from cbd_ray.data import read_utf8

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file {p} does not exist")
    raw = read_utf8(p)  # a byte that is not UTF-8 is refused with file:line, never replaced
    texts: list[str] = []
    if p.suffix in (".jsonl", ".json") or raw.lstrip().startswith("{"):
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CBDError(f"calibration file {p}:{n}: not valid JSON ({exc.msg})") from None
            if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                texts.append(rec["text"])
            elif isinstance(rec, dict) and "instruction" in rec:
                texts.append("\n\n".join(str(rec[k]) for k in ("instruction", "context", "input", "response", "output")
                                         if rec.get(k)))
            else:
                raise CBDError(f"calibration file {p}:{n}: record has no 'text' or 'instruction' field")
            if len(texts) >= limit:
                break
    else:
        texts = [t.strip() for t in raw.split("\n\n") if t.strip()][:limit]
    if not texts:
        raise CBDError(f"calibration file {p} holds no text")
    return texts


# --------------------------------------------------------------------------- alpha


def _check_alpha(alpha: Any, layers: int) -> None:
    def ok(a: Any) -> bool:
        return isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and 0.0 <= a <= 1.0

    if isinstance(alpha, str):
        if alpha != "auto":
            raise CBDError(f"alpha={alpha!r}: expected a number in [0, 1], 'auto' or a per-layer list")
    elif isinstance(alpha, (list, tuple)):
        if len(alpha) != layers:
            raise CBDError(f"alpha schedule has {len(alpha)} values; the target has {layers} layers")
        bad = [a for a in alpha if not ok(a)]
        if bad:
            raise CBDError(f"alpha schedule values {bad} are outside [0, 1]")
    elif not ok(alpha):
        raise CBDError(f"alpha={alpha!r} is outside [0, 1] (or not a number); use a number in [0, 1] or 'auto'")


def _frac(v: float, a: float, b: float) -> float:
    return 0.0 if a == b else (v - a) / (b - a)


# --------------------------------------------------------------------------- the pair


def check_pair(s: Checkpoint, l: Checkpoint) -> None:
    """Refuse two anchors whose tensors do not line up: another family, vocabulary, layout
    option (``compat_keys``) or head_dim (IncompatibleModelsError or CBDError naming both)."""
    arch_s, arch_l = s.config.architectures[0], l.config.architectures[0]
    if arch_s != arch_l:
        raise IncompatibleModelsError(
            f"anchors are of different families ({arch_s} at {s.path}, {arch_l} at {l.path}); "
            "interpolation needs one family: bridge first (distil the source into the chain's family with SeqKD)")
    if s.adapter.vocab_size != l.adapter.vocab_size or not _same_vocab(s.path, l.path):
        raise IncompatibleModelsError(
            f"anchors have different vocabularies ({s.adapter.vocab_size} tokens at {s.path}, "
            f"{l.adapter.vocab_size} at {l.path}); bridge first (SeqKD into one tokenizer's family)")
    for key in s.adapter.compat_keys:
        vs, vl = getattr(s.config, key, None), getattr(l.config, key, None)
        if vs != vl:
            raise IncompatibleModelsError(f"anchors differ in {key} ({vs!r} vs {vl!r}); their tensors do not line up")
    if s.adapter.head_dim != l.adapter.head_dim:
        raise CBDError(
            f"anchors have different head_dim ({s.adapter.head_dim} at {s.path}, {l.adapter.head_dim} at {l.path}); "
            "interpolation keeps head_dim fixed, so both anchors must share it")


@dataclass(frozen=True)
class TargetRules:
    """Which targets two anchors of one family can make, by shape alone: every axis between
    the anchors' values, the parameter count between theirs, kv_heads and ffn filled in when
    not given, and the α that the parameter counts imply. No weights are read."""

    adapter: Any
    small_shape: Shape
    large_shape: Shape
    small_params: int
    large_params: int

    def params_of(self, shape: Shape) -> int:
        """Exact parameter count of a model of this family at ``shape``."""
        return self.adapter.param_count(shape)

    def default_kv(self, shape: Shape) -> int | None:
        if not self.adapter.has_gqa:
            return None
        S, L = self.small_shape, self.large_shape
        g_s, g_l = S.heads // S.kv_heads, L.heads // L.kv_heads
        if g_s == g_l and shape.heads % g_s == 0:
            return shape.heads // g_s
        want = S.kv_heads + _frac(shape.heads, S.heads, L.heads) * (L.kv_heads - S.kv_heads)
        lo, hi = sorted((S.kv_heads, L.kv_heads))
        divs = [d for d in range(lo, hi + 1) if shape.heads % d == 0]
        if not divs:
            raise CBDError(f"no kv_heads between the anchors' {lo} and {hi} divides heads={shape.heads}; give kv_heads")
        return min(divs, key=lambda d: (abs(d - want), d))

    def default_ffn(self, shape: Shape) -> int:
        S, L = self.small_shape, self.large_shape
        r_s, r_l = S.ffn / S.hidden, L.ffn / L.hidden
        if r_s == r_l and (r_s * shape.hidden).is_integer():
            ffn = int(r_s * shape.hidden)
        else:
            ffn = round(S.ffn + _frac(shape.hidden, S.hidden, L.hidden) * (L.ffn - S.ffn))
        lo, hi = sorted((S.ffn, L.ffn))
        return min(max(ffn, lo), hi)

    def validate(self, shape: Shape, alpha: Alpha = "auto") -> Shape:
        """Check ``shape`` and ``alpha`` against the anchors (before any work) and return
        the shape with kv_heads and ffn filled in (kv_heads keeps the anchors' GQA group
        size, ffn their ffn/hidden ratio, when not given). Raises CBDError naming the bad
        value and the anchors' shapes."""
        if not isinstance(shape, Shape):
            shape = parse_shape(shape)
        kv = shape.kv_heads
        if not self.adapter.has_gqa:
            if kv is not None and kv != shape.heads:
                raise CBDError(f"{self.adapter.family} has no grouped-query attention: kv_heads={kv} must equal heads={shape.heads}")
            kv = None
        shape = Shape(shape.layers, shape.hidden, shape.heads, kv, shape.ffn)
        self.adapter.check_shape(shape)
        if self.adapter.has_gqa and shape.kv_heads is None:
            shape = Shape(shape.layers, shape.hidden, shape.heads, self.default_kv(shape), shape.ffn)
            self.adapter.check_shape(shape)
        if shape.ffn is None:
            shape = Shape(shape.layers, shape.hidden, shape.heads, shape.kv_heads, self.default_ffn(shape))
        S, L = self.small_shape, self.large_shape
        where = f"the anchors are small {S.label()} ({self.small_params:,} parameters) and large {L.label()} ({self.large_params:,})"
        axes = ["layers", "hidden", "heads", "ffn"] + (["kv_heads"] if self.adapter.has_gqa else [])
        for ax in axes:
            v, a, b = getattr(shape, ax), getattr(S, ax), getattr(L, ax)
            lo, hi = min(a, b), max(a, b)
            if not lo <= v <= hi:
                raise CBDError(f"{ax}={v} is outside the anchors' range [{lo}, {hi}]; {where}")
        p = self.params_of(shape)
        lo, hi = sorted((self.small_params, self.large_params))
        if not lo <= p <= hi:
            raise CBDError(f"target {shape.label()} has {p:,} parameters, outside the anchors' range; {where}")
        _check_alpha(alpha, shape.layers)
        return shape

    def auto_alpha(self, shape: Shape) -> float:
        """(P_large − P_target) / (P_large − P_small), clipped to [0, 1] (0.5 when the anchors
        have the same count)."""
        pl, ps = self.large_params, self.small_params
        if pl == ps:
            return 0.5
        return float(min(1.0, max(0.0, (pl - self.params_of(shape)) / (pl - ps))))


class AnchorPair:
    """Two anchor checkpoints of one family, checked once, that make many targets.

    Opening validates both checkpoints (files, headers, every tensor's shape), that they
    share family, vocabulary, head_dim and layout options, and the resize options; the
    calibration text is tokenised once. Importance scores are computed on first use and
    cached, so a pair serves a whole grid.
    """

    def __init__(self, small_dir: str | os.PathLike, large_dir: str | os.PathLike, resize: ResizeOptions | None = None,
                 align: str = "auto") -> None:
        if align not in ALIGN_MODES:
            raise CBDError(f"align={align!r} is not one of {', '.join(ALIGN_MODES)}")
        self.align = align  # auto: permute the small anchor to the large unless it descends from it (cbd_ray.align)
        self._align_on: bool | None = None
        self.resize = (resize or ResizeOptions()).resolved()
        self.small = Checkpoint(small_dir)
        self.large = Checkpoint(large_dir)
        s, l = self.small, self.large
        check_pair(s, l)
        self.adapter = s.adapter
        self.rules = TargetRules(s.adapter, s.shape, l.shape, s.params, l.params)
        self.small_shape: Shape = s.shape
        self.large_shape: Shape = l.shape
        self.small_params: int = s.params
        self.large_params: int = l.params
        blocks = None
        if self.resize.calib_texts:
            src = s if s.tokenizer_files() else l
            if not src.tokenizer_files():
                raise CBDError("calibration text needs a tokenizer beside one of the anchors; neither has one")
            blocks = calib_blocks(src.load_tokenizer(), self.resize.calib_texts)
        self._scorers = (Scorer(s, blocks), Scorer(l, blocks))
        # Hash the anchors' weight files (for cbd.json) in the background: the first target's
        # work overlaps it, and a bad target is refused without waiting for it.
        self._hashing: threading.Thread | None = threading.Thread(target=self._hash_anchors, name="anchor-sha256",
                                                                  daemon=True)
        self._hashing.start()

    def _hash_anchors(self) -> None:
        for c in (self.small, self.large):
            try:
                c.checksums  # noqa: B018 - cached property, computed here
            except Exception:  # noqa: BLE001 - computed again (and raised) where it is needed
                pass

    def _hashed(self) -> None:
        if self._hashing is not None:
            self._hashing.join()
            self._hashing = None

    def __getstate__(self) -> dict[str, Any]:
        self._hashed()  # a thread does not travel (e.g. to a Ray actor); its results do
        return dict(self.__dict__)

    def prepare(self) -> None:
        """Do the once-per-pair work now rather than inside the first :meth:`make`: hash
        both anchors' weight files and compute the importance scores the resize options
        use (so the first target's time is like every other's)."""
        self._hashed()
        for sc in self._scorers:
            sc.ckpt.checksums  # noqa: B018 - cached property, computed here
            if self.resize.width_subset == "importance" or self.resize.layer_subset == "importance":
                sc.activations()
            elif self.resize.width_subset == "magnitude":
                sc.magnitude_hidden()

    # ------------------------------------------------------------------ checks (TargetRules)
    def params_of(self, shape: Shape) -> int:
        """Exact parameter count of a model of this family at ``shape``."""
        return self.rules.params_of(shape)

    def validate_target(self, shape: Shape, alpha: Alpha = "auto") -> Shape:
        """:meth:`TargetRules.validate`: ``shape`` with kv_heads and ffn filled in, or a CBDError."""
        return self.rules.validate(shape, alpha)

    def auto_alpha(self, shape: Shape) -> float:
        """:meth:`TargetRules.auto_alpha`."""
        return self.rules.auto_alpha(shape)

    # ------------------------------------------------------------------ making
    def _key(self, shape: Shape, alpha: Any) -> dict[str, Any]:
        """What identifies a target: anchors by hash, shape, α, resize choices."""
        self._hashed()
        return {
            "family": self.small.config.architectures[0],
            "anchor_weights": {k: c.checksums for k, c in (("small", self.small), ("large", self.large))},
            "target": shape.as_dict(),
            "alpha": alpha,
            "resize": self.resize.describe(),
            "align_mode": self.align,
        }

    def _same_key(self, out: Path, shape: Shape, alpha: Any) -> bool:
        """``out/cbd.json`` records these anchors (by hash), shape, α and resize choices."""
        key = self._key(shape, alpha)
        existing = _read_json(out / "cbd.json")
        return isinstance(existing, dict) and {k: existing.get(k) for k in key} == json.loads(json.dumps(key))

    def _intact_same(self, out: Path, shape: Shape, alpha: Any) -> bool:
        """The same target is in ``out`` and every file matches the sha256 recorded when it
        was written (a truncated or edited weight file is rebuilt, never reused)."""
        if not self._same_key(out, shape, alpha):
            return False
        files = (_read_json(out / "cbd.json") or {}).get("files")
        if not isinstance(files, dict) or not files:
            return False  # written before checksums were recorded: cannot be trusted
        from cbd_ray.storage import verify_checksums

        return not verify_checksums(out, files)

    def _aligned(self, shape: Shape, plan_small: ResizePlan, work: Path) -> tuple[Checkpoint, ResizePlan, dict[str, Any]]:
        """The small anchor to blend (aligned to the large one resized to ``shape`` when the
        align mode says so), its resize plan and the record for cbd.json."""
        if self._align_on is None:
            self._align_on = resolve_align(self.align, self.small.path, self.large.path)
        if not self._align_on:
            return self.small, plan_small, {"mode": self.align, "applied": False,
                                            **({"reason": "the small anchor descends from the large one"}
                                               if self.align == "auto" else {})}
        al, rec = alignment_plan(self.small, self._scorers[0], self._scorers[1], shape, self.resize)
        if al is None:
            return self.small, plan_small, {"mode": self.align, **rec}
        ck = Checkpoint(write_aligned(self.small, al.permutation(), work, rec))
        log.info("aligned the small anchor: %s", {k: rec[k].get("moved") for k in ("hidden", "heads", "ffn")})
        # the reordered anchor's units go to their matched slots (zeros elsewhere), not to the first ones
        plan = al.expand(plan_resize(Scorer(ck, self._scorers[0].blocks), shape, self.resize))
        return ck, plan, {"mode": self.align, **rec}

    def make(self, shape: Shape, out_dir: str | os.PathLike, alpha: Alpha = "auto", overwrite: bool = False,
             name: str | None = None) -> dict[str, Any]:
        """Make one target model in ``out_dir``. Returns ``{"name", "shape", "params",
        "alpha", "seconds", "path"}`` (plus ``"reused": True`` when an identical target was
        already there)."""
        t0 = time.perf_counter()
        shape = self.validate_target(shape, alpha)
        out = Path(out_dir)
        name = name or out.name
        if isinstance(alpha, str):
            a_val: float | list[float] = self.auto_alpha(shape)
        elif isinstance(alpha, (list, tuple)):
            a_val = [float(a) for a in alpha]
        else:
            a_val = float(alpha)
        per_layer = a_val if isinstance(a_val, list) else [a_val] * shape.layers
        a_outer = sum(per_layer) / len(per_layer)
        params = self.params_of(shape)
        record = {"name": name, "shape": shape.as_dict(), "params": params, "alpha": a_val, "path": str(out)}
        state = guard_output(out, inputs={"small anchor": self.small.path, "large anchor": self.large.path}, overwrite=overwrite,
                             marker=("cbd.json",), own=MODEL_FILES, reuse=True)
        if state == "ours" and not overwrite:
            if self._intact_same(out, shape, a_val):
                log.info("%s: identical target already at %s", name, out)
                return {**record, "seconds": 0.0, "reused": True}
            if not self._same_key(out, shape, a_val):
                raise FileExistsError(f"--out {out} already exists and holds a different model; "
                                      "pass overwrite (--overwrite) to replace it")
            log.warning("%s: %s holds this target but its files do not match their recorded sha256; rebuilding",
                        name, out)
        overwrite = state != "absent"  # empty, ours and damaged, or ours with overwrite
        a_txt = f"{a_val:.4f}" if isinstance(a_val, float) else str(a_val)
        log.info("%s: %s, %s parameters, alpha %s", name, shape.label(), f"{params:,}", a_txt)
        used = [w > 0 for w in (max(per_layer + [a_outer]), 1 - min(per_layer + [a_outer]))]
        plans = [plan_resize(sc, shape, self.resize) if u else None for sc, u in zip(self._scorers, used)]
        small, align = self.small, {"mode": self.align, "applied": False, "reason": "one anchor only (α is 0 or 1)"}
        work = out.parent / f".{out.name}.aligned-{os.getpid()}-{threading.get_ident()}"
        try:
            if all(used):
                small, plans[0], align = self._aligned(shape, plans[0], work)

            def meta() -> dict[str, Any]:  # called after the weights are written: hashing overlaps the work
                return {**self._key(shape, a_val), "name": name, "params": params, "align": align,
                        "anchors": {k: {"path": str(c.path.resolve()), "shape": c.shape.as_dict(), "params": c.params,
                                        "weights": c.checksums}
                                    for k, c in (("small", self.small), ("large", self.large))},
                        "plan": {k: (p.summary()["layers"] if p else None) for k, p in zip(("small", "large"), plans)}}

            with engine_threads():
                write_model(out, shape, [small, self.large], plans, per_layer, a_outer, overwrite, meta)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        record["aligned"] = bool(align.get("applied"))
        return record


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _same_vocab(a: Path, b: Path) -> bool:
    """False only when both anchors ship a tokenizer.json whose BPE/WordPiece vocabularies differ."""
    ta, tb = _read_json(a / "tokenizer.json"), _read_json(b / "tokenizer.json")
    if ta is None or tb is None:
        return True
    return (ta.get("model") or {}).get("vocab") == (tb.get("model") or {}).get("vocab")


# --------------------------------------------------------------------------- one-shot API


def interpolate(small_dir: str | os.PathLike, large_dir: str | os.PathLike, shape: Shape | str | dict,
                out_dir: str | os.PathLike, alpha: Alpha = "auto", resize: ResizeOptions | None = None,
                overwrite: bool = False, align: str = "auto") -> dict[str, Any]:
    """Make one target between two anchors (see :class:`AnchorPair.make`)."""
    return AnchorPair(small_dir, large_dir, resize=resize, align=align).make(parse_shape(shape), out_dir, alpha=alpha,
                                                                            overwrite=overwrite)


def resize_model(src_dir: str | os.PathLike, shape: Shape | str | dict, out_dir: str | os.PathLike,
                 resize: ResizeOptions | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Resize one model to ``shape`` (any shape of its family: no anchor range applies) and
    write it as a model directory; returns the same record as :meth:`AnchorPair.make`."""
    t0 = time.perf_counter()
    opts = (resize or ResizeOptions()).resolved()
    ck = Checkpoint(src_dir)
    shape = parse_shape(shape)
    if not ck.adapter.has_gqa:
        shape = Shape(shape.layers, shape.hidden, shape.heads, None, shape.ffn)
    elif shape.kv_heads is None:
        shape = Shape(shape.layers, shape.hidden, shape.heads, shape.heads * ck.shape.kv_heads // ck.shape.heads or 1, shape.ffn)
    if shape.ffn is None:
        shape = Shape(shape.layers, shape.hidden, shape.heads, shape.kv_heads, ck.shape.ffn * shape.hidden // ck.shape.hidden)
    ck.adapter.check_shape(shape)
    out = Path(out_dir)
    overwrite = guard_output(out, inputs=(ck.path,), overwrite=overwrite, marker=("cbd.json",),
                             own=MODEL_FILES) != "absent"
    blocks = calib_blocks(ck.load_tokenizer(), opts.calib_texts) if opts.calib_texts else None
    plan = plan_resize(Scorer(ck, blocks), shape, opts)
    params = ck.adapter.param_count(shape)
    meta = {"family": ck.config.architectures[0], "name": out.name, "target": shape.as_dict(), "alpha": 1.0,
            "params": params, "resize": opts.describe(),
            "anchors": {"small": {"path": str(ck.path.resolve()), "shape": ck.shape.as_dict(), "params": ck.params,
                                  "weights": ck.checksums},
                        "large": {"path": str(ck.path.resolve()), "shape": ck.shape.as_dict(), "params": ck.params,
                                  "weights": ck.checksums}},
            "plan": {"small": plan.summary()["layers"], "large": None}}
    with engine_threads():
        write_model(out, shape, [ck, ck], [plan, None], [1.0] * shape.layers, 1.0, overwrite, lambda: meta)
    return {"name": out.name, "shape": shape.as_dict(), "params": params, "alpha": 1.0,
            "seconds": round(time.perf_counter() - t0, 3), "path": str(out)}

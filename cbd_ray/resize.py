"""Per-axis resizing of one model's tensors: subset, keep or expand each structural axis.

A :class:`ResizePlan` says, for a source checkpoint and a target :class:`Shape`, which
source unit fills every target slot on every axis:

- layers: a list of (source layer, identity?) pairs. Subset by uniform spacing (first and
  last layer always kept) or by block influence (keep the layers with the largest
  1 − cos(h_in, h_out) on calibration text). Expand by replication spread evenly (each
  source layer repeated ⌊n_t/n_s⌋ or ⌈n_t/n_s⌉ times, in order) or by identity-initialised
  insertion: the same positions, but each repeat is a copy of its layer with every tensor
  that writes into the residual stream (attention output and MLP down projections and
  their biases) zeroed, so the inserted block computes the identity.
- hidden, heads, kv_heads, ffn: an :class:`AxisMap`, a source index per target slot
  (−1: a zero slot). Subset by importance (Minitron: calibration activations), weight
  magnitude, or first-k; the kept units stay in their original order. Expand by zero
  padding (the paper) or by copying (slot k takes source k mod n_s) with rescaling.
  The hidden map is chosen once per model and applied to every tensor with a hidden axis.
  Heads move whole (all of Q/K/V and the output-projection columns of a head). With
  grouped-query attention a kv head and its query group move together: the kv map is
  chosen first (a kv head's importance is the sum of its query heads'), then each kept
  group's query heads are chosen inside it. Head and FFN maps are chosen per layer.

Copy expansion divides every weight that *reads* a copied unit (the input axis of a
matrix) by that unit's number of copies, so a sum over the copies equals the original
term. That is exact (the model computes the same function) for copied FFN neurons and
heads at any ratio, and for copied hidden channels when every channel is copied the same
number of times (an integer ratio): then LayerNorm/RMSNorm statistics over the widened
stream equal the original ones. With a tied LM head the 1/copies factor moves from the
(shared) embedding matrix to the final norm, which feeds only the LM head. At a
non-integer hidden ratio the norm statistics change and the function is only approximated.
Zero padding keeps padded slots exactly zero but is not function-preserving for hidden
(the zero channels change LayerNorm's mean and variance; RMSNorm's too).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from cbd_ray.arch import ArchAdapter, Shape, TensorSpec, adapter_for
from cbd_ray.errors import CBDError, CheckpointError
from cbd_ray.resize_choices import LAYER_EXPAND, LAYER_SUBSET, WIDTH_EXPAND, WIDTH_SUBSET  # noqa: F401 (re-exported)

#: torch intra-op threads while a model is resized and blended and while weight norms are
#: summed. That work is memory-bound (gathers, elementwise blends, float64 sums of squares in
#: small blocks) and overlaps a writer thread (and, for a new pair, a hashing thread); more
#: intra-op threads gain little there, and on a machine whose cores were busy their barriers
#: made the same work 10-30x slower and erratic. Results do not depend on it (copies and
#: elementwise arithmetic are exact per element; norms are summed in float64).
ENGINE_THREADS = 1


@contextlib.contextmanager
def engine_threads() -> Iterator[None]:
    """Run the block with :data:`ENGINE_THREADS` torch threads, restoring the caller's after."""
    prev = torch.get_num_threads()
    if prev == ENGINE_THREADS:
        yield
        return
    torch.set_num_threads(ENGINE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


#: calibration: tokens per block and at most this many blocks
CALIB_BLOCK = 128
CALIB_MAX_BLOCKS = 16


@dataclass
class ResizeOptions:
    """How each axis is subset or expanded.

    ``layer_subset`` and ``width_subset`` default to None: "importance" when
    ``calib_texts`` are given, otherwise "uniform" (layers) and "magnitude" (widths).
    """

    layer_subset: str | None = None  # "uniform" | "importance"
    layer_expand: str = "replicate"  # "replicate" | "identity"
    width_subset: str | None = None  # "importance" | "magnitude" | "first"
    width_expand: str = "zero"  # "zero" | "copy"
    calib_texts: list[str] | None = None

    def resolved(self) -> "ResizeOptions":
        """A copy with the None defaults filled in, after checking every value."""
        if self.calib_texts is not None and (
                isinstance(self.calib_texts, str) or not all(isinstance(t, str) for t in self.calib_texts)):
            raise CBDError("calib_texts must be a list of strings (read a file with cbd_ray.interpolate.load_calib_texts)")
        calib = bool(self.calib_texts)
        out = ResizeOptions(
            layer_subset=self.layer_subset or ("importance" if calib else "uniform"),
            layer_expand=self.layer_expand,
            width_subset=self.width_subset or ("importance" if calib else "magnitude"),
            width_expand=self.width_expand,
            calib_texts=list(self.calib_texts) if self.calib_texts else None,
        )
        for key, allowed in (("layer_subset", LAYER_SUBSET), ("layer_expand", LAYER_EXPAND),
                             ("width_subset", WIDTH_SUBSET), ("width_expand", WIDTH_EXPAND)):
            v = getattr(out, key)
            if v not in allowed:
                raise CBDError(f"resize {key}={v!r} is not one of {', '.join(allowed)}")
        if "importance" in (out.layer_subset, out.width_subset) and not calib:
            raise CBDError("importance-based subsetting needs calibration text (calib_texts / --calib)")
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (calibration text by count and sha256, not inline)."""
        import hashlib

        r = self.resolved()
        calib = None
        if r.calib_texts:
            h = hashlib.sha256("\x00".join(r.calib_texts).encode()).hexdigest()
            calib = {"texts": len(r.calib_texts), "sha256": h}
        return {"layer_subset": r.layer_subset, "layer_expand": r.layer_expand,
                "width_subset": r.width_subset, "width_expand": r.width_expand, "calib": calib}


# --------------------------------------------------------------------------- axis maps


@dataclass(frozen=True)
class AxisMap:
    """For every target slot the source unit that fills it (−1: a zero slot).

    ``copies[k]`` is how many target slots hold the source unit of slot k (1 when not
    copy-expanded); readers of copied units divide by it.
    """

    index: tuple[int, ...]
    n_src: int

    @property
    def identity(self) -> bool:
        return self.index == tuple(range(self.n_src))

    @cached_property
    def copies(self) -> tuple[int, ...]:
        counts: dict[int, int] = {}
        for i in self.index:
            counts[i] = counts.get(i, 0) + 1
        return tuple(counts[i] if i >= 0 else 1 for i in self.index)

    @property
    def copied(self) -> bool:
        return any(c > 1 for c in self.copies)

    @cached_property
    def runs(self) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]], int]:
        """(runs of filled slots, runs of zero slots, number of filled slots); a run is
        (target start, source start, length) where both advance by one."""
        pairs = [(k, i) for k, i in enumerate(self.index) if i >= 0]
        return _runs(pairs), _runs([(k, k) for k, i in enumerate(self.index) if i < 0]), len(pairs)

    @cached_property
    def gather_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(source indices, target slots) of the filled slots as int64 tensors (built once
        per map: the same map serves many tensors and targets)."""
        pairs = [(k, i) for k, i in enumerate(self.index) if i >= 0]
        return (torch.tensor([i for _, i in pairs], dtype=torch.long),
                torch.tensor([k for k, _ in pairs], dtype=torch.long))

    def rows(self, unit: int, offset: int = 0) -> "AxisMap":
        """The same map at element level: each unit spans ``unit`` consecutive elements."""
        return _rows(self, unit, offset)

    def _rows(self, unit: int, offset: int) -> "AxisMap":
        idx = []
        for i in self.index:
            idx.extend([-1] * unit if i < 0 else range(offset + i * unit, offset + (i + 1) * unit))
        return AxisMap(tuple(idx), self.n_src * unit)

    def row_copies(self, unit: int) -> tuple[int, ...]:
        return tuple(c for c in self.copies for _ in range(unit))


@functools.lru_cache(maxsize=512)
def _rows(m: AxisMap, unit: int, offset: int) -> AxisMap:
    return m._rows(unit, offset)  # cached: the same head map serves every tensor of a layer


def _top_k_sorted(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, ties to the lower index, returned in ascending order."""
    order = torch.sort(-scores.double(), stable=True).indices[:k]
    return sorted(int(i) for i in order)


def choose(n_src: int, n_tgt: int, scores: Callable[[], torch.Tensor] | None, subset: str, expand: str) -> AxisMap:
    """The AxisMap from ``n_src`` units to ``n_tgt`` slots. ``scores()`` (shape [n_src],
    larger = more important) is called only when a subset by score is needed."""
    if n_tgt == n_src:
        return AxisMap(tuple(range(n_src)), n_src)
    if n_tgt < n_src:
        if subset == "first" or scores is None:
            return AxisMap(tuple(range(n_tgt)), n_src)
        s = scores()
        if s.shape != (n_src,):
            raise RuntimeError(f"importance scores have shape {tuple(s.shape)}, expected ({n_src},)")
        return AxisMap(tuple(_top_k_sorted(s, n_tgt)), n_src)
    if expand == "copy":
        return AxisMap(tuple(k % n_src for k in range(n_tgt)), n_src)
    return AxisMap(tuple(range(n_src)) + (-1,) * (n_tgt - n_src), n_src)


def head_maps(
    src_heads: int, src_kv: int, tgt_heads: int, tgt_kv: int,
    scores: Callable[[], torch.Tensor] | None, subset: str, expand: str,
) -> tuple[AxisMap, AxisMap]:
    """(query-head map, kv-head map) respecting GQA groups; ``scores()`` gives one score
    per source query head (shape [src_heads])."""
    g_s, g_t = src_heads // src_kv, tgt_heads // tgt_kv
    cache: list[torch.Tensor] = []

    def q_scores() -> torch.Tensor:
        if not cache:
            cache.append(scores())
        return cache[0]

    kv_scores = None if scores is None else (lambda: q_scores().view(src_kv, g_s).sum(1))
    kv_map = choose(src_kv, tgt_kv, kv_scores, subset, expand)
    q: list[int] = []
    for k in kv_map.index:
        if k < 0:
            q.extend([-1] * g_t)
            continue
        inner = None if scores is None else (lambda k=k: q_scores()[k * g_s:(k + 1) * g_s])
        gm = choose(g_s, g_t, inner, subset, expand)
        q.extend(-1 if j < 0 else k * g_s + j for j in gm.index)
    return AxisMap(tuple(q), src_heads), kv_map


def layer_map(n_src: int, n_tgt: int, scores: Callable[[], torch.Tensor] | None, subset: str, expand: str) -> list[tuple[int, bool]]:
    """(source layer, identity-initialised?) for every target layer."""
    if n_tgt == n_src:
        return [(i, False) for i in range(n_src)]
    if n_tgt < n_src:
        if subset == "importance" and scores is not None:
            keep = _top_k_sorted(scores(), n_tgt)
        elif n_tgt == 1:
            keep = [0]
        else:
            keep = [int(math.floor(i * (n_src - 1) / (n_tgt - 1) + 0.5)) for i in range(n_tgt)]
        return [(i, False) for i in keep]
    src = [(i * n_src) // n_tgt for i in range(n_tgt)]
    return [(s, expand == "identity" and j > 0 and src[j - 1] == s) for j, s in enumerate(src)]


# --------------------------------------------------------------------------- checkpoints

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")


class Checkpoint:
    """A Hugging Face model directory read lazily, one tensor at a time, from safetensors.

    Opening checks everything a resize will need, before any work: ``config.json`` present
    and of a supported architecture, safetensors weights present with readable headers,
    every tensor of the family's table present with the shape the config implies. Pickled
    weights (``pytorch_model.bin``) are never loaded.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config = self._read_config()
        self.adapter: ArchAdapter = adapter_for(self.config)
        self.shape: Shape = self.adapter.shape_of(self.config)
        self.files = self._weight_files()
        self._where = self._locate(self._read_headers())
        self._handles: dict[Path, Any] = {}

    def _read_config(self) -> Any:
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint {self.path} is not a directory")
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"checkpoint {self.path} has no config.json")
        try:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(str(self.path), trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad checkpoint
            raise CheckpointError(f"checkpoint {self.path}: config.json cannot be read: {exc}") from exc

    def _read_headers(self) -> dict[str, Path]:
        """Every stored tensor's file, shape and dtype from the safetensors headers alone."""
        from safetensors import safe_open

        keys: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        keys[k] = f
                        sl = h.get_slice(k)
                        self._shapes[k] = tuple(sl.get_shape())
                        self._dtypes[k] = _DTYPES.get(sl.get_dtype(), torch.float32)
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"checkpoint {self.path}: safetensors header of {f.name} is unreadable: {exc}") from exc
        return keys

    def _locate(self, keys: dict[str, Path]) -> dict[str, tuple[Path, str]]:
        """Table name -> (file, stored name) of every tensor of the family's table, each
        checked against the shape the config implies."""
        where: dict[str, tuple[Path, str]] = {}
        for spec in self.adapter.stored():
            for layer in range(self.shape.layers) if spec.per_layer else [None]:
                name = spec.name_at(layer)
                actual = next((a for a in _aliases(name) if a in keys), None)
                if actual is None:
                    raise CheckpointError(f"checkpoint {self.path}: tensor {name} is missing from {', '.join(f.name for f in self.files)}")
                want = self.adapter.tensor_shape(spec, self.shape)
                if self._shapes[actual] != want:
                    raise CheckpointError(
                        f"checkpoint {self.path}: tensor {name} has shape {list(self._shapes[actual])}, "
                        f"the config implies {list(want)}")
                where[name] = (keys[actual], actual)
        return where

    def _weight_files(self) -> list[Path]:
        single = self.path / "model.safetensors"
        index = self.path / "model.safetensors.index.json"
        if single.is_file():
            return [single]
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"checkpoint {self.path}: {index.name} is unreadable: {exc}") from exc
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise CheckpointError(f"checkpoint {self.path}: shards missing: {', '.join(missing)}")
            return [self.path / n for n in names]
        if any(self.path.glob("pytorch_model*.bin")):
            raise CheckpointError(
                f"checkpoint {self.path} has only pickled weights (pytorch_model.bin), which are never loaded; "
                "convert it to safetensors first (e.g. load it once in a trusted environment and "
                "save_pretrained(..., safe_serialization=True))")
        raise CheckpointError(f"checkpoint {self.path} has no model.safetensors (or sharded model.safetensors.index.json)")

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d

    @property
    def dtype(self) -> torch.dtype:
        name = self.adapter.stored()[0].name
        return self._dtypes[self._where[name][1]]

    def get(self, name: str) -> torch.Tensor:
        """One stored tensor by its table name (shape as stored)."""
        from safetensors import safe_open

        f, actual = self._where[name]
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = safe_open(str(f), framework="pt")
        return h.get_tensor(actual)

    def tensor(self, spec: TensorSpec, layer: int | None) -> torch.Tensor:
        """The stored tensor of ``spec`` (a tied tensor returns the one it is tied to)."""
        if spec.tied_to is not None:
            return self.get(spec.tied_to)
        return self.get(spec.name_at(layer))

    @cached_property
    def params(self) -> int:
        return self.adapter.param_count(self.shape)

    @cached_property
    def checksums(self) -> dict[str, str]:
        """sha256 of every weight file (computed once)."""
        from cbd_ray.storage import file_sha256

        return {f.name: file_sha256(f) for f in self.files}

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _aliases(name: str) -> list[str]:
    """Names a tensor may carry in other checkpoints (hub GPT-2 drops ``transformer.``,
    GPT-NeoX's LM head may be saved as ``lm_head``)."""
    out = [name]
    for prefix in ("transformer.", "gpt_neox.", "model."):
        if name.startswith(prefix):
            out.append(name[len(prefix):])
    if name == "embed_out.weight":
        out.append("lm_head.weight")
    return out


#: elements per block of the float64 sums of squares (512 KiB of float64: stays in cache)
_NORM_BLOCK = 1 << 16


def _sq_sums(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ x² over every dimension of ``t`` but ``dim`` → float64 [size(dim)].

    The squares are taken and summed in float64 (the square of a float32/bf16 value is exact
    there and the sum's error is ~1e-16 relative in any order), so the result does not depend
    on the summation order or the thread count. The tensor is converted block by block of
    about 65,000 elements, so no float64 copy of a large matrix is made. (A float32
    ``vector_norm`` over dim 0 of a [vocab, hidden] matrix reduces across rows, ~20x slower.)
    """
    x = t.detach()
    n = x.shape[dim]
    a, b = math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1:])
    x = x.reshape(a, n, b)
    acc = torch.zeros(n, dtype=torch.float64)
    if a == 1:  # the axis leads: blocks of whole slices, each summed along its contiguous rest
        step = max(1, _NORM_BLOCK // max(b, 1))
        for s in range(0, n, step):
            d = x[0, s:s + step].double()
            acc[s:s + step] = (d * d).sum(1)
    else:  # blocks of leading rows, each adding its [n] partial sums
        step = max(1, _NORM_BLOCK // max(n * b, 1))
        for s in range(0, a, step):
            d = x[s:s + step].double()
            acc += (d * d).sum(dim=(0, 2))
    return acc


def _unit_norms(t: torch.Tensor, dim: int, unit: int) -> torch.Tensor:
    """L2 norm of each group of ``unit`` consecutive slices along ``dim``, divided by the
    mean over groups → float64 [size(dim) / unit]."""
    n = _sq_sums(t, dim).view(-1, unit).sum(1).sqrt()
    return n / n.mean().clamp_min(1e-30)


def calib_blocks(tokenizer: Any, texts: Sequence[str], block: int = CALIB_BLOCK, max_blocks: int = CALIB_MAX_BLOCKS) -> torch.Tensor:
    """Calibration text → token blocks [n, block] (texts joined with EOS, no padding)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= block * max_blocks:
            break
    if not ids:
        raise CBDError("calibration text is empty")
    if len(ids) < block:
        block = len(ids)
    n = min(max_blocks, len(ids) // block)
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)


# --------------------------------------------------------------------------- plans


@dataclass
class ResizePlan:
    """Which source unit fills every slot of a target shape (see the module docstring)."""

    source: Shape
    target: Shape
    layers: list[tuple[int, bool]]
    hidden: AxisMap
    heads: list[AxisMap]  # per target layer, query heads (head units)
    kv_heads: list[AxisMap]  # per target layer, kv heads (head units)
    ffn: list[AxisMap]  # per target layer
    copy_scale: bool = False  # copy expansion: readers of copied units divide by copies
    tied: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "layers": [[s, ident] for s, ident in self.layers],
            "hidden": _summ(self.hidden),
            "heads": [_summ(m) for m in self.heads],
            "kv_heads": [_summ(m) for m in self.kv_heads],
            "ffn": [_summ(m) for m in self.ffn],
        }


def _summ(m: AxisMap) -> Any:
    if m.identity:
        return "keep"
    return list(m.index)


class Scorer:
    """Importance scores of one checkpoint, computed lazily and cached (a scorer serves
    many targets): weight magnitudes per unit, or activations on calibration ``blocks``."""

    def __init__(self, ckpt: Checkpoint, blocks: torch.Tensor | None) -> None:
        self.ckpt = ckpt
        self.blocks = blocks
        self._act: dict[str, Any] | None = None
        self._magnitude: dict[str, torch.Tensor] = {}

    def activations(self) -> dict[str, Any]:
        if self._act is None:
            if self.blocks is None:
                raise CBDError("importance-based subsetting needs calibration text")
            self._act = activation_scores(self.ckpt, self.blocks)
        return self._act

    def magnitude_hidden(self) -> torch.Tensor:
        """Per hidden channel [hidden]: the sum over every matrix with a hidden axis of the
        channel's L2 norm, each matrix normalised by its mean channel norm (so no single
        matrix dominates by scale)."""
        if "hidden" not in self._magnitude:
            with engine_threads():
                self._magnitude["hidden"] = self._magnitude_hidden()
        return self._magnitude["hidden"]

    def _magnitude_hidden(self) -> torch.Tensor:
        total = torch.zeros(self.ckpt.shape.hidden, dtype=torch.float64)
        seen: dict[tuple[str, int], torch.Tensor] = {}
        for spec in self.ckpt.adapter.stored():
            if spec.kind not in ("linear", "embedding") or "hidden" not in spec.axes:
                continue
            for layer in range(self.ckpt.shape.layers) if spec.per_layer else [None]:
                # a tied tensor (the LM head) is its twin's matrix: norms computed once, counted twice
                key = (spec.tied_to or spec.name_at(layer), spec.axes.index("hidden"))
                if key not in seen:
                    seen[key] = _unit_norms(self.ckpt.tensor(spec, layer), key[1], 1)
                total += seen[key]
        return total

    def magnitude_heads(self, layer: int) -> torch.Tensor:
        """Per query head [heads]: L2 norm of the head's columns in the attention output
        projection (how strongly the head writes into the residual stream)."""
        key = f"heads.{layer}"
        if key not in self._magnitude:
            a = self.ckpt.adapter
            spec = next(s for s in a.stored() if s.residual_out and "heads" in s.axes)
            with engine_threads():
                self._magnitude[key] = _unit_norms(self.ckpt.tensor(spec, layer), spec.axes.index("heads"), a.head_dim)
        return self._magnitude[key]

    def magnitude_ffn(self, layer: int) -> torch.Tensor:
        """Per FFN neuron [ffn]: sum of the neuron's normalised L2 norms in every matrix with
        an ffn axis (its input rows and its output column)."""
        key = f"ffn.{layer}"
        if key not in self._magnitude:
            total = torch.zeros(self.ckpt.shape.ffn, dtype=torch.float64)
            with engine_threads():
                for spec in self.ckpt.adapter.stored():
                    if spec.per_layer and spec.kind == "linear" and "ffn" in spec.axes:
                        total += _unit_norms(self.ckpt.tensor(spec, layer), spec.axes.index("ffn"), 1)
            self._magnitude[key] = total
        return self._magnitude[key]

    def scores(self, axis: str, mode: str, layer: int | None = None) -> Callable[[], torch.Tensor] | None:
        if mode == "first":
            return None
        if mode == "importance":
            if axis == "layers":
                return lambda: self.activations()["layers"]
            if axis == "hidden":
                return lambda: self.activations()["hidden"]
            return lambda: self.activations()[axis][layer]
        if axis == "hidden":
            return self.magnitude_hidden
        if axis == "heads":
            return lambda: self.magnitude_heads(layer)
        if axis == "ffn":
            return lambda: self.magnitude_ffn(layer)
        return None


def activation_scores(ckpt: Checkpoint, blocks: torch.Tensor) -> dict[str, Any]:
    """Minitron-style importance from one forward pass over calibration ``blocks``
    ([n, T] token ids): ``hidden`` [hidden] = Σ|norm output| over every LayerNorm/RMSNorm,
    ``heads`` [layers, heads] = Σ‖per-head attention output‖₂ (the input of the output
    projection), ``ffn`` [layers, ffn] = Σ|input of the MLP down projection|,
    ``layers`` [layers] = block influence, mean over tokens of 1 − cos(h_in, h_out)."""
    from transformers import AutoModelForCausalLM

    a, s = ckpt.adapter, ckpt.shape
    if a.positions and blocks.shape[1] > a.positions:  # learned positions end there (GPT-2 n_positions)
        blocks = blocks[:, :a.positions]
    model = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=torch.float32).eval()
    hidden = torch.zeros(s.hidden, dtype=torch.float64)
    heads = torch.zeros(s.layers, s.heads, dtype=torch.float64)
    ffn = torch.zeros(s.layers, s.ffn, dtype=torch.float64)
    bi = torch.zeros(s.layers, dtype=torch.float64)
    ins: dict[int, torch.Tensor] = {}
    hooks = []
    mods = dict(model.named_modules())

    def mod(spec: TensorSpec, layer: int | None):
        return mods[spec.name_at(layer).rsplit(".", 1)[0]]

    def on_norm(_m, _inp, out):
        hidden.add_(out.detach().abs().sum(dim=(0, 1)).double())

    def on_heads(layer):
        def f(_m, inp):
            x = inp[0].detach()
            heads[layer] += x.view(*x.shape[:-1], s.heads, a.head_dim).norm(dim=-1).sum(dim=(0, 1)).double()
        return f

    def on_ffn(layer):
        def f(_m, inp):
            ffn[layer] += inp[0].detach().abs().sum(dim=(0, 1)).double()
        return f

    def on_layer_in(layer):
        def f(_m, args, kwargs):
            ins[layer] = (args[0] if args else kwargs["hidden_states"]).detach()
        return f

    def on_layer_out(layer):
        def f(_m, _inp, out):
            h = (out[0] if isinstance(out, tuple) else out).detach()
            cos = torch.nn.functional.cosine_similarity(ins.pop(layer).double(), h.double(), dim=-1)
            bi[layer] += (1 - cos).sum()
        return f

    try:
        for spec in a.stored():
            layers = range(s.layers) if spec.per_layer else [None]
            if spec.kind == "norm" and spec.axes == ("hidden",) and spec.name.endswith(".weight"):
                hooks += [mod(spec, i).register_forward_hook(on_norm) for i in layers]
            elif spec.residual_out and spec.kind == "linear" and "heads" in spec.axes:
                hooks += [mod(spec, i).register_forward_pre_hook(on_heads(i)) for i in layers]
            elif spec.residual_out and spec.kind == "linear" and "ffn" in spec.axes:
                hooks += [mod(spec, i).register_forward_pre_hook(on_ffn(i)) for i in layers]
        for i in range(s.layers):
            m = mods[a.layer_module.format(layer=i)]
            hooks.append(m.register_forward_pre_hook(on_layer_in(i), with_kwargs=True))
            hooks.append(m.register_forward_hook(on_layer_out(i)))
        with torch.no_grad():
            for b in blocks.split(4):
                model(input_ids=b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        del model
    return {"hidden": hidden, "heads": heads, "ffn": ffn, "layers": bi / blocks.numel()}


def plan_resize(scorer: Scorer, target: Shape, options: ResizeOptions) -> ResizePlan:
    """The ResizePlan taking ``scorer.ckpt`` to ``target`` (options already resolved)."""
    ck = scorer.ckpt
    src, a = ck.shape, ck.adapter
    tgt_ffn = target.ffn if target.ffn is not None else 4 * target.hidden
    src_kv = src.kv_heads or src.heads
    tgt_kv = target.kv_heads or target.heads
    sub, exp = options.width_subset, options.width_expand
    layers = layer_map(src.layers, target.layers,
                       scorer.scores("layers", "importance") if options.layer_subset == "importance" else None,
                       options.layer_subset, options.layer_expand)
    hidden = choose(src.hidden, target.hidden, scorer.scores("hidden", sub), sub, exp)
    per_src: dict[int, tuple[AxisMap, AxisMap, AxisMap]] = {}
    heads, kvs, ffns = [], [], []
    for s, _ in layers:
        if s not in per_src:
            q, kv = head_maps(src.heads, src_kv, target.heads, tgt_kv, scorer.scores("heads", sub, s), sub, exp)
            f = choose(src.ffn, tgt_ffn, scorer.scores("ffn", sub, s), sub, exp)
            per_src[s] = (q, kv, f)
        q, kv, f = per_src[s]
        heads.append(q)
        kvs.append(kv)
        ffns.append(f)
    return ResizePlan(src, target, layers, hidden, heads, kvs, ffns, copy_scale=exp == "copy", tied=a.tied)


def _runs(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(target start, source start, length) of maximal runs where both advance by one."""
    runs: list[list[int]] = []
    for k, i in pairs:
        if runs and runs[-1][0] + runs[-1][2] == k and runs[-1][1] + runs[-1][2] == i:
            runs[-1][2] += 1
        else:
            runs.append([k, i, 1])
    return [tuple(r) for r in runs]  # type: ignore[misc]


_MAX_RUNS = 16


def _take(t: torch.Tensor, dim: int, m: AxisMap) -> torch.Tensor:
    """Select ``m.index`` along ``dim``; −1 slots become zero. Maps made of a few
    contiguous runs (zero padding, copying, first-k) are copied slice by slice, which is
    much faster than a gather along a non-leading dimension."""
    if m.identity:
        return t
    runs, zero_runs, filled = m.runs
    n = len(m.index)
    if filled == n and len(runs) == 1:
        return t.narrow(dim, runs[0][1], n)
    shape = list(t.shape)
    shape[dim] = n
    if len(runs) <= _MAX_RUNS:
        out = t.new_empty(shape)
        for k, i, length in runs:
            out.narrow(dim, k, length).copy_(t.narrow(dim, i, length))
        for k, _, length in zero_runs:  # zero only the padded slots (not the whole tensor first)
            out.narrow(dim, k, length).zero_()
        return out
    src_idx, dst_idx = m.gather_index
    src = _select(t, dim, src_idx)
    if filled == n:
        return src
    return t.new_zeros(shape).index_copy_(dim, dst_idx, src)


def _select(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``t.index_select(dim, idx)`` (the same values). Along a later dimension of a
    contiguous tensor a gather with a broadcast index walks memory in order, several times
    faster than index_select, which copies one strided slice per index."""
    if dim == 0 or not t.is_contiguous():
        return t.index_select(dim, idx)
    view = [1] * t.ndim
    view[dim] = idx.numel()
    out = list(t.shape)
    out[dim] = idx.numel()
    return torch.gather(t, dim, idx.view(view).expand(out))


def _scale(t: torch.Tensor, dim: int, copies: Sequence[int]) -> torch.Tensor:
    """Divide slices along ``dim`` by their number of copies."""
    if all(c == 1 for c in copies):
        return t
    shape = [1] * t.ndim
    shape[dim] = len(copies)
    f = torch.tensor([1.0 / c for c in copies], dtype=torch.float32).view(shape)
    return (t.float() * f).to(t.dtype)


@functools.lru_cache(maxsize=256)
def _fused_qkv(q: AxisMap, kv: AxisMap, head_dim: int) -> AxisMap:
    """GPT-2's fused columns [Q | K | V], each (source heads x head_dim); K/V follow the kv map."""
    a_q, a_kv = q.n_src * head_dim, kv.n_src * head_dim
    parts = [q.rows(head_dim), kv.rows(head_dim, a_q), kv.rows(head_dim, a_q + a_kv)]
    return AxisMap(sum((p.index for p in parts), ()), a_q + 2 * a_kv)


def axis_maps(spec: TensorSpec, plan: ResizePlan, layer: int | None, head_dim: int
              ) -> list[tuple[int, AxisMap, tuple[int, ...] | None]]:
    """For each resized dimension of ``spec`` at target layer ``layer``: (dim, element-level
    map, copies to divide by — None when the dimension is not a copied input)."""
    out: list[tuple[int, AxisMap, tuple[int, ...] | None]] = []
    for dim, role in enumerate(spec.axes):
        reads = plan.copy_scale and dim == spec.in_dim
        if role == "hidden":
            m = plan.hidden
            # with a tied LM head the final norm carries the LM head's 1/copies factor
            scale = plan.copy_scale and (dim == spec.in_dim or (spec.final_norm and plan.tied))
            out.append((dim, m, m.copies if scale and m.copied else None))
        elif role in ("heads", "kv_heads"):
            q, kv = plan.heads[layer], plan.kv_heads[layer]
            if spec.packing == "qkv_fused_conv1d":
                out.append((dim, _fused_qkv(q, kv, head_dim), None))
            elif spec.packing == "qkv_interleaved":
                # rows grouped [head][q, k, v][head_dim]: a head is a block of 3 x head_dim rows
                out.append((dim, q.rows(3 * head_dim), None))
            else:
                m = q if role == "heads" else kv
                out.append((dim, m.rows(head_dim), m.row_copies(head_dim) if reads and m.copied else None))
        elif role == "ffn":
            m = plan.ffn[layer]
            out.append((dim, m, m.copies if reads and m.copied else None))
    return out


def _zeroed(spec: TensorSpec, plan: ResizePlan, layer: int | None) -> bool:
    """An identity-initialised inserted layer writes nothing into the residual stream."""
    return spec.per_layer and plan.layers[layer][1] and spec.residual_out


def resize_tensor(t: torch.Tensor, spec: TensorSpec, plan: ResizePlan, layer: int | None, head_dim: int) -> torch.Tensor:
    """Resize one stored tensor ``t`` of ``spec`` for target layer ``layer`` (None for
    tensors outside the layers) according to ``plan``; returns the target-shaped tensor.
    The result may be a view of ``t`` (unchanged axes, a single contiguous run)."""
    if _zeroed(spec, plan, layer):
        t = torch.zeros_like(t)
    for dim, m, copies in axis_maps(spec, plan, layer, head_dim):
        t = _take(t, dim, m)
        if copies is not None:
            t = _scale(t, dim, copies)
    return t


def add_resized_(out: torch.Tensor, t: torch.Tensor, spec: TensorSpec, plan: ResizePlan, layer: int | None,
                 head_dim: int, weight: float) -> bool:
    """``out += weight · resize(t)`` without building ``resize(t)`` when it is a few boxes
    of ``t`` over zeros (zero padding, first-k, unchanged axes): only the filled boxes are
    touched. Returns False, having done nothing, when the map needs a gather or rescaling."""
    if _zeroed(spec, plan, layer):
        return True
    maps = {dim: (m, copies) for dim, m, copies in axis_maps(spec, plan, layer, head_dim)}
    runs_per_dim = []
    for dim in range(t.ndim):
        if dim not in maps or maps[dim][0].identity:
            runs_per_dim.append([(0, 0, t.shape[dim])])
            continue
        m, copies = maps[dim]
        runs = m.runs[0]
        if copies is not None or len(runs) > _MAX_RUNS:
            return False
        runs_per_dim.append(runs)
    for box in itertools.product(*runs_per_dim):
        dst, src = out, t
        for dim, (k, i, length) in enumerate(box):
            dst, src = dst.narrow(dim, k, length), src.narrow(dim, i, length)
        dst.add_(src, alpha=weight)
    return True

"""The weight-layout table of a model family: what every tensor is, axis by axis.

Resizing and interpolation read only this table. A :class:`TensorSpec` names one tensor
(``{layer}`` in the template for per-layer tensors) and gives, for each of its dimensions in
the order Hugging Face stores it, the *role* of that axis:

``hidden``    the residual stream width (d_model)
``heads``     query heads x head_dim (whole heads move together)
``kv_heads``  key/value heads x head_dim (GQA)
``ffn``       MLP intermediate neurons
``vocab``     token ids
``positions`` learned absolute positions (GPT-2 ``wpe``)
``head_dim``  one head's width (Qwen3 ``q_norm``/``k_norm``); never resized
``None``      anything else; never resized

``packing`` says how Q/K/V share one tensor: ``qkv_fused_conv1d`` (GPT-2 ``c_attn``: the
``heads`` axis holds [Q | K | V], each heads x head_dim) or ``qkv_interleaved`` (GPT-NeoX
``query_key_value``: rows grouped [head][q, k, v][head_dim]). ``transposed`` marks GPT-2's
Conv1D weights, stored [in, out] instead of nn.Linear's [out, in]. ``tied_to`` names the
tensor a tied one shares storage with (it is not stored, counted or written separately).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from cbd_ray.errors import CBDError

ROLES = ("hidden", "heads", "kv_heads", "ffn", "vocab", "positions", "head_dim", None)
PACKINGS = ("qkv_fused_conv1d", "qkv_interleaved", None)
KINDS = ("linear", "embedding", "norm", "bias")


@dataclass(frozen=True)
class Shape:
    """A model shape: depth and the widths that interpolation resizes.

    ``kv_heads`` is None for families without grouped-query attention (GPT-2, GPT-NeoX);
    ``ffn`` is the MLP intermediate size. head_dim is a property of the family instance
    (the anchors' head_dim), not of the shape.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int | None = None
    ffn: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)

    def label(self) -> str:
        s = f"{self.layers}x{self.hidden}x{self.heads}"
        if self.kv_heads is not None and self.kv_heads != self.heads:
            s += f"/kv{self.kv_heads}"
        if self.ffn is not None:
            s += f"/ffn{self.ffn}"
        return s


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a family's layout (see the module docstring for the roles).

    ``kind``: ``linear`` (a matrix that contracts its input axis: dim 1 for nn.Linear
    [out, in], dim 0 when ``transposed``), ``embedding`` (a lookup table, no input axis),
    ``norm`` (a LayerNorm/RMSNorm weight or bias), ``bias`` (a linear layer's bias).
    ``residual_out``: the tensor writes into the residual stream from inside a block
    (attention output and MLP down projections and their biases); zeroing these makes the
    block the identity, which is how identity-initialised layers are inserted.
    ``final_norm``: the norm whose output feeds only the LM head.
    """

    name: str
    axes: tuple[str | None, ...]
    kind: str = "linear"
    packing: str | None = None
    transposed: bool = False
    tied_to: str | None = None
    residual_out: bool = False
    final_norm: bool = False

    def __post_init__(self) -> None:
        bad = [a for a in self.axes if a not in ROLES]
        if bad or self.packing not in PACKINGS or self.kind not in KINDS:
            raise ValueError(f"bad TensorSpec {self}")

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.name

    def name_at(self, layer: int | None) -> str:
        return self.name.format(layer=layer) if self.per_layer else self.name

    @property
    def in_dim(self) -> int | None:
        """The dimension this tensor contracts with its input (None for non-matrices)."""
        if self.kind != "linear" or len(self.axes) != 2:
            return None
        return 0 if self.transposed else 1


class ArchAdapter:
    """A family's layout table bound to one config (which fixes optional tensors such as
    biases and the tying of the LM head).

    Subclasses set ``architectures`` and ``family`` and implement :meth:`_table`,
    :meth:`shape_of`, :meth:`_set_shape` and :attr:`head_dim`.
    """

    architectures: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    #: module path of decoder layer ``{layer}`` (for calibration hooks)
    layer_module: ClassVar[str] = ""
    #: config fields that must agree between two anchors for their tensors to line up
    compat_keys: ClassVar[tuple[str, ...]] = ()
    #: True when the target must satisfy heads * head_dim == hidden
    heads_span_hidden: ClassVar[bool] = True
    #: True when the family has grouped-query attention (kv_heads is an axis of its own)
    has_gqa: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config
        self.tensors: tuple[TensorSpec, ...] = tuple(self._table(config))

    # ------------------------------------------------------------------ per family
    def _table(self, config: Any) -> list[TensorSpec]:  # pragma: no cover - abstract
        raise NotImplementedError

    def shape_of(self, config: Any) -> Shape:  # pragma: no cover - abstract
        """The :class:`Shape` of a config of this family."""
        raise NotImplementedError

    def _set_shape(self, d: dict[str, Any], shape: Shape) -> None:  # pragma: no cover - abstract
        """Write ``shape`` into a config dict of this family (in place)."""
        raise NotImplementedError

    @property
    def head_dim(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ generic
    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    @property
    def positions(self) -> int:
        return int(getattr(self.config, "n_positions", 0) or getattr(self.config, "max_position_embeddings", 0))

    def stored(self) -> list[TensorSpec]:
        """The tensors a checkpoint stores (tied ones excluded)."""
        return [t for t in self.tensors if t.tied_to is None]

    def dims(self, shape: Shape, vocab: int | None = None) -> dict[str, int]:
        """Size of every axis role at ``shape`` (``heads``/``kv_heads`` in rows: count x head_dim)."""
        kv = shape.kv_heads if shape.kv_heads is not None else shape.heads
        return {
            "hidden": shape.hidden,
            "heads": shape.heads * self.head_dim,
            "kv_heads": kv * self.head_dim,
            "ffn": shape.ffn if shape.ffn is not None else 4 * shape.hidden,
            "vocab": self.vocab_size if vocab is None else vocab,
            "positions": self.positions,
            "head_dim": self.head_dim,
        }

    def tensor_shape(self, spec: TensorSpec, shape: Shape, vocab: int | None = None) -> tuple[int, ...]:
        """The stored shape of ``spec`` in a model of ``shape``."""
        d = self.dims(shape, vocab)
        out = []
        for role in spec.axes:
            if role is None:
                raise ValueError(f"{spec.name}: axis without a role has no size")
            n = d[role]
            if role == "heads" and spec.packing is not None:
                kv = shape.kv_heads if shape.kv_heads is not None else shape.heads
                n = (shape.heads + 2 * kv) * self.head_dim
            out.append(n)
        return tuple(out)

    def param_count(self, shape: Shape, vocab: int | None = None) -> int:
        """Exact parameter count of a model of ``shape`` (tied tensors counted once); equals
        ``sum(p.numel() for p in model.parameters())`` of the Hugging Face model."""
        total = 0
        for spec in self.stored():
            n = 1
            for s in self.tensor_shape(spec, shape, vocab):
                n *= s
            total += n * (shape.layers if spec.per_layer else 1)
        return total

    def config_for(self, base_config: Any, shape: Shape) -> Any:
        """A new config of ``base_config``'s class with ``shape`` written into it (every other
        field, architectures included, kept)."""
        d = copy.deepcopy(base_config.to_dict())
        self._set_shape(d, shape)
        n = shape.layers
        # Per-layer lists (Qwen2/Qwen3 ``layer_types``) must have one entry per layer.
        lt = d.get("layer_types")
        if isinstance(lt, list) and lt:
            d["layer_types"] = [lt[min(len(lt) - 1, (i * len(lt)) // n)] for i in range(n)]
        for k in ("_name_or_path", "transformers_version"):
            d.pop(k, None)
        cfg = type(base_config).from_dict(d)
        cfg.architectures = list(base_config.architectures)
        return cfg

    def check_shape(self, shape: Shape) -> None:
        """Raise CBDError when ``shape`` cannot be a model of this family at this head_dim."""
        for k in ("layers", "hidden", "heads"):
            v = getattr(shape, k)
            if not isinstance(v, int) or v < 1:
                raise CBDError(f"{k}={v!r} must be a positive integer")
        if shape.ffn is not None and (not isinstance(shape.ffn, int) or shape.ffn < 1):
            raise CBDError(f"ffn={shape.ffn!r} must be a positive integer")
        if self.heads_span_hidden:
            if shape.hidden % shape.heads:
                raise CBDError(f"heads={shape.heads} does not divide hidden={shape.hidden}")
            if shape.heads * self.head_dim != shape.hidden:
                raise CBDError(
                    f"heads={shape.heads} x head_dim {self.head_dim} (the anchors' head_dim) = "
                    f"{shape.heads * self.head_dim}, not hidden={shape.hidden}; use heads={shape.hidden // self.head_dim}"
                    if shape.hidden % self.head_dim == 0 else
                    f"hidden={shape.hidden} is not a multiple of the anchors' head_dim {self.head_dim}"
                )
        if shape.kv_heads is not None:
            if not self.has_gqa and shape.kv_heads != shape.heads:
                raise CBDError(f"{self.family} has no grouped-query attention: kv_heads must equal heads ({shape.heads})")
            if not isinstance(shape.kv_heads, int) or shape.kv_heads < 1 or shape.heads % shape.kv_heads:
                raise CBDError(f"kv_heads={shape.kv_heads} does not divide heads={shape.heads}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.architectures[0]})"

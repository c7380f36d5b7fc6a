"""Llama, Qwen2 and Qwen3: split q/k/v projections, grouped-query attention (kv_heads),
gated MLP (gate/up/down), RMSNorm. Qwen2 adds q/k/v biases; Qwen3 adds ``q_norm``/``k_norm``
(RMSNorm over head_dim) and an explicit ``head_dim`` that need not equal hidden / heads.
"""
from __future__ import annotations

from typing import Any

from cbd_ray.arch.base import ArchAdapter, Shape, TensorSpec


class LlamaAdapter(ArchAdapter):
    architectures = ("LlamaForCausalLM",)
    family = "llama"
    layer_module = "model.layers.{layer}"
    compat_keys = ("tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "rope_parameters")
    has_gqa = True
    #: which of q/k/v/o carry a bias: read from the config in _biases
    qkv_norm = False

    def _biases(self, config: Any) -> tuple[bool, bool]:
        """(q/k/v bias, o_proj bias)."""
        b = bool(getattr(config, "attention_bias", False))
        return b, b

    def _table(self, config: Any) -> list[TensorSpec]:
        L = "model.layers.{layer}."
        qkv_bias, o_bias = self._biases(config)
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        t = [TensorSpec("model.embed_tokens.weight", ("vocab", "hidden"), kind="embedding")]
        t.append(TensorSpec(L + "input_layernorm.weight", ("hidden",), kind="norm"))
        for p, role in (("q", "heads"), ("k", "kv_heads"), ("v", "kv_heads")):
            t.append(TensorSpec(L + f"self_attn.{p}_proj.weight", (role, "hidden")))
            if qkv_bias:
                t.append(TensorSpec(L + f"self_attn.{p}_proj.bias", (role,), kind="bias"))
        t.append(TensorSpec(L + "self_attn.o_proj.weight", ("hidden", "heads"), residual_out=True))
        if o_bias:
            t.append(TensorSpec(L + "self_attn.o_proj.bias", ("hidden",), kind="bias", residual_out=True))
        if self.qkv_norm:
            t.append(TensorSpec(L + "self_attn.q_norm.weight", ("head_dim",), kind="norm"))
            t.append(TensorSpec(L + "self_attn.k_norm.weight", ("head_dim",), kind="norm"))
        t.append(TensorSpec(L + "post_attention_layernorm.weight", ("hidden",), kind="norm"))
        for p in ("gate", "up"):
            t.append(TensorSpec(L + f"mlp.{p}_proj.weight", ("ffn", "hidden")))
            if mlp_bias:
                t.append(TensorSpec(L + f"mlp.{p}_proj.bias", ("ffn",), kind="bias"))
        t.append(TensorSpec(L + "mlp.down_proj.weight", ("hidden", "ffn"), residual_out=True))
        if mlp_bias:
            t.append(TensorSpec(L + "mlp.down_proj.bias", ("hidden",), kind="bias", residual_out=True))
        t.append(TensorSpec("model.norm.weight", ("hidden",), kind="norm", final_norm=True))
        tied = bool(getattr(config, "tie_word_embeddings", False))
        t.append(TensorSpec("lm_head.weight", ("vocab", "hidden"), tied_to="model.embed_tokens.weight" if tied else None))
        return t

    @property
    def head_dim(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else self.config.hidden_size // self.config.num_attention_heads

    def shape_of(self, config: Any) -> Shape:
        return Shape(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=config.num_attention_heads,
                     kv_heads=config.num_key_value_heads or config.num_attention_heads, ffn=config.intermediate_size)

    def _set_shape(self, d: dict[str, Any], shape: Shape) -> None:
        d.update(num_hidden_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
                 num_key_value_heads=shape.kv_heads if shape.kv_heads is not None else shape.heads,
                 intermediate_size=shape.ffn if shape.ffn is not None else 4 * shape.hidden)
        if "head_dim" in d or not self.heads_span_hidden:
            d["head_dim"] = self.head_dim


class Qwen2Adapter(LlamaAdapter):
    """Qwen2: biases on q/k/v (not on o_proj), no MLP bias."""

    architectures = ("Qwen2ForCausalLM",)
    family = "qwen2"
    compat_keys = ("tie_word_embeddings", "hidden_act", "rope_parameters")

    def _biases(self, config: Any) -> tuple[bool, bool]:
        return True, False


class Qwen3Adapter(LlamaAdapter):
    """Qwen3: q_norm/k_norm over head_dim, explicit head_dim (heads x head_dim may differ
    from hidden, so only heads and hidden are checked independently)."""

    architectures = ("Qwen3ForCausalLM",)
    family = "qwen3"
    compat_keys = ("tie_word_embeddings", "hidden_act", "attention_bias", "rope_parameters")
    qkv_norm = True
    heads_span_hidden = False

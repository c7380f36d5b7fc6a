"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``): Q/K/V interleaved per head, parallel
residual, rotary positions (no position table), untied ``embed_out``.

``query_key_value.weight`` is [3 x hidden, hidden] whose rows are grouped
[head][q, k, v][head_dim] (the model views the output as (..., heads, 3 x head_dim) and
chunks the last axis), so moving a head moves one contiguous block of 3 x head_dim rows.
"""
from __future__ import annotations

from typing import Any

from cbd_ray.arch.base import ArchAdapter, Shape, TensorSpec


class GPTNeoXAdapter(ArchAdapter):
    architectures = ("GPTNeoXForCausalLM",)
    family = "gpt_neox"
    layer_module = "gpt_neox.layers.{layer}"
    compat_keys = ("tie_word_embeddings", "use_parallel_residual", "hidden_act", "attention_bias", "rope_parameters")

    def _table(self, config: Any) -> list[TensorSpec]:
        L = "gpt_neox.layers.{layer}."
        bias = bool(getattr(config, "attention_bias", True))
        t = [TensorSpec("gpt_neox.embed_in.weight", ("vocab", "hidden"), kind="embedding")]
        t += [
            TensorSpec(L + "input_layernorm.weight", ("hidden",), kind="norm"),
            TensorSpec(L + "input_layernorm.bias", ("hidden",), kind="norm"),
            TensorSpec(L + "post_attention_layernorm.weight", ("hidden",), kind="norm"),
            TensorSpec(L + "post_attention_layernorm.bias", ("hidden",), kind="norm"),
            TensorSpec(L + "attention.query_key_value.weight", ("heads", "hidden"), packing="qkv_interleaved"),
        ]
        if bias:
            t.append(TensorSpec(L + "attention.query_key_value.bias", ("heads",), kind="bias", packing="qkv_interleaved"))
        t.append(TensorSpec(L + "attention.dense.weight", ("hidden", "heads"), residual_out=True))
        if bias:
            t.append(TensorSpec(L + "attention.dense.bias", ("hidden",), kind="bias", residual_out=True))
        t += [
            TensorSpec(L + "mlp.dense_h_to_4h.weight", ("ffn", "hidden")),
            TensorSpec(L + "mlp.dense_h_to_4h.bias", ("ffn",), kind="bias"),
            TensorSpec(L + "mlp.dense_4h_to_h.weight", ("hidden", "ffn"), residual_out=True),
            TensorSpec(L + "mlp.dense_4h_to_h.bias", ("hidden",), kind="bias", residual_out=True),
            TensorSpec("gpt_neox.final_layer_norm.weight", ("hidden",), kind="norm", final_norm=True),
            TensorSpec("gpt_neox.final_layer_norm.bias", ("hidden",), kind="norm", final_norm=True),
        ]
        tied = bool(getattr(config, "tie_word_embeddings", False))
        # Checkpoints (Pythia's and transformers' own save_pretrained) call the LM head
        # embed_out; transformers 5 renames it lm_head in the module tree when loading. The
        # table uses the on-disk name; the checkpoint reader accepts either.
        t.append(TensorSpec("embed_out.weight", ("vocab", "hidden"), tied_to="gpt_neox.embed_in.weight" if tied else None))
        return t

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    def shape_of(self, config: Any) -> Shape:
        return Shape(layers=config.num_hidden_layers, hidden=config.hidden_size,
                     heads=config.num_attention_heads, kv_heads=None, ffn=config.intermediate_size)

    def _set_shape(self, d: dict[str, Any], shape: Shape) -> None:
        d.update(num_hidden_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
                 intermediate_size=shape.ffn if shape.ffn is not None else 4 * shape.hidden)

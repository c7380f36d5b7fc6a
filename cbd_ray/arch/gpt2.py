"""GPT-2 (``GPT2LMHeadModel``): fused Q/K/V in one Conv1D, learned positions, tied LM head.

GPT-2's Conv1D stores weights as [in, out], the transpose of nn.Linear's [out, in]; the
``transposed`` flag says so, so ``c_attn.weight`` is [hidden, 3 x hidden] with columns
[Q | K | V], each heads x head_dim.
"""
from __future__ import annotations

from typing import Any

from cbd_ray.arch.base import ArchAdapter, Shape, TensorSpec


class GPT2Adapter(ArchAdapter):
    architectures = ("GPT2LMHeadModel",)
    family = "gpt2"
    layer_module = "transformer.h.{layer}"
    compat_keys = ("n_positions", "tie_word_embeddings", "activation_function", "scale_attn_by_inverse_layer_idx")

    def _table(self, config: Any) -> list[TensorSpec]:
        L = "transformer.h.{layer}."
        t = [
            TensorSpec("transformer.wte.weight", ("vocab", "hidden"), kind="embedding"),
            TensorSpec("transformer.wpe.weight", ("positions", "hidden"), kind="embedding"),
            TensorSpec(L + "ln_1.weight", ("hidden",), kind="norm"),
            TensorSpec(L + "ln_1.bias", ("hidden",), kind="norm"),
            TensorSpec(L + "attn.c_attn.weight", ("hidden", "heads"), packing="qkv_fused_conv1d", transposed=True),
            TensorSpec(L + "attn.c_attn.bias", ("heads",), kind="bias", packing="qkv_fused_conv1d"),
            TensorSpec(L + "attn.c_proj.weight", ("heads", "hidden"), transposed=True, residual_out=True),
            TensorSpec(L + "attn.c_proj.bias", ("hidden",), kind="bias", residual_out=True),
            TensorSpec(L + "ln_2.weight", ("hidden",), kind="norm"),
            TensorSpec(L + "ln_2.bias", ("hidden",), kind="norm"),
            TensorSpec(L + "mlp.c_fc.weight", ("hidden", "ffn"), transposed=True),
            TensorSpec(L + "mlp.c_fc.bias", ("ffn",), kind="bias"),
            TensorSpec(L + "mlp.c_proj.weight", ("ffn", "hidden"), transposed=True, residual_out=True),
            TensorSpec(L + "mlp.c_proj.bias", ("hidden",), kind="bias", residual_out=True),
            TensorSpec("transformer.ln_f.weight", ("hidden",), kind="norm", final_norm=True),
            TensorSpec("transformer.ln_f.bias", ("hidden",), kind="norm", final_norm=True),
        ]
        tied = bool(getattr(config, "tie_word_embeddings", True))
        t.append(TensorSpec("lm_head.weight", ("vocab", "hidden"), tied_to="transformer.wte.weight" if tied else None))
        return t

    @property
    def head_dim(self) -> int:
        return self.config.n_embd // self.config.n_head

    def shape_of(self, config: Any) -> Shape:
        return Shape(layers=config.n_layer, hidden=config.n_embd, heads=config.n_head,
                     kv_heads=None, ffn=config.n_inner or 4 * config.n_embd)

    def _set_shape(self, d: dict[str, Any], shape: Shape) -> None:
        d.update(n_layer=shape.layers, n_embd=shape.hidden, n_head=shape.heads,
                 n_inner=shape.ffn if shape.ffn is not None else 4 * shape.hidden)

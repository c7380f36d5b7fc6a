"""Weight-layout tables: every family's table names exactly the tensors the Hugging Face
model has, with the right shapes; parameter counts are exact; configs round-trip; the tiny
models the tests build of every family load back through transformers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cbd_ray.arch import SUPPORTED, adapter_for
from cbd_ray.errors import CBDError
from cbd_ray.interpolate import Shape
from cbd_ray.tiny import FAMILIES, tiny_config

VARIANTS = [
    ("gpt2", {}),
    ("gpt2", {"tie_word_embeddings": False}),
    ("gpt_neox", {}),
    ("gpt_neox", {"tie_word_embeddings": True}),
    ("llama", {"kv_heads": 2}),
    ("llama", {"kv_heads": 1, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("qwen2", {"kv_heads": 2}),
    ("qwen3", {"kv_heads": 2}),
    ("qwen3", {"kv_heads": 4, "head_dim": 16}),  # heads x head_dim (64) != hidden (32)
]


@pytest.mark.parametrize("family,extra", VARIANTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(VARIANTS)])
def test_table_matches_hf_parameters_and_counts_them_exactly(family, extra):
    extra = dict(extra)
    tie = extra.pop("tie_word_embeddings", None)
    cfg = tiny_config(family, layers=3, hidden=32, heads=4, ffn=48, vocab_size=97, **extra)
    if tie is not None:
        cfg.tie_word_embeddings = tie
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    a = adapter_for(model.config)
    shape = a.shape_of(model.config)
    # tied parameters appear once; GPT-NeoX's LM head is embed_out on disk, lm_head in the module
    params = {("embed_out.weight" if k == "lm_head.weight" and family == "gpt_neox" else k): p
              for k, p in model.named_parameters()}
    named = {}
    for spec in a.stored():
        for layer in range(shape.layers) if spec.per_layer else [None]:
            named[spec.name_at(layer)] = a.tensor_shape(spec, shape)
    assert set(named) == set(params)
    for name, want in named.items():
        assert tuple(params[name].shape) == want, name
    assert a.param_count(shape) == sum(p.numel() for p in model.parameters())
    # a tied table entry points at a stored tensor
    for spec in a.tensors:
        if spec.tied_to:
            assert a.tied and spec.tied_to in named


@pytest.mark.parametrize("family", FAMILIES)
def test_config_for_writes_the_shape_and_keeps_everything_else(family):
    base = tiny_config(family, vocab_size=97, layers=2, hidden=32, heads=4, ffn=64,
                       **({"kv_heads": 2} if family in ("llama", "qwen2", "qwen3") else {}))
    a = adapter_for(base)
    gqa = family in ("llama", "qwen2", "qwen3")
    target = Shape(layers=3, hidden=48, heads=6, kv_heads=3 if gqa else None, ffn=80)
    cfg = a.config_for(base, target)
    assert type(cfg) is type(base) and cfg.architectures == base.architectures
    assert a.shape_of(cfg) == target
    assert cfg.vocab_size == base.vocab_size and cfg.tie_word_embeddings == base.tie_word_embeddings
    if getattr(cfg, "layer_types", None) is not None:
        assert len(cfg.layer_types) == 3
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    assert adapter_for(cfg).param_count(target) == sum(p.numel() for p in model.parameters())


def test_unknown_architecture_names_the_supported_ones():
    cfg = tiny_config("gpt2")
    cfg.architectures = ["BertForMaskedLM"]
    with pytest.raises(CBDError) as e:
        adapter_for(cfg)
    assert "BertForMaskedLM" in str(e.value)
    for name in SUPPORTED:
        assert name in str(e.value)
    assert set(SUPPORTED) == {"GPT2LMHeadModel", "GPTNeoXForCausalLM", "LlamaForCausalLM",
                              "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


def test_check_shape_rejects_heads_not_dividing_hidden_and_bad_kv_heads():
    llama = adapter_for(tiny_config("llama", hidden=32, heads=4))  # head_dim 8
    with pytest.raises(CBDError, match="heads=5 does not divide hidden=32"):
        llama.check_shape(Shape(2, 32, 5, 5, 64))
    with pytest.raises(CBDError, match="head_dim 8"):
        llama.check_shape(Shape(2, 32, 2, 2, 64))
    with pytest.raises(CBDError, match="kv_heads=3 does not divide heads=4"):
        llama.check_shape(Shape(2, 32, 4, 3, 64))
    gpt2 = adapter_for(tiny_config("gpt2", hidden=32, heads=4))
    with pytest.raises(CBDError, match="no grouped-query attention"):
        gpt2.check_shape(Shape(2, 32, 4, 2, 64))
    # Qwen3 keeps an explicit head_dim: heads x head_dim need not equal hidden
    adapter_for(tiny_config("qwen3", hidden=32, heads=4, head_dim=16)).check_shape(Shape(2, 32, 4, 2, 64))


def test_tensor_roles_of_packed_qkv():
    g = adapter_for(tiny_config("gpt2"))
    c_attn = next(s for s in g.tensors if s.name.endswith("c_attn.weight"))
    assert c_attn.transposed and c_attn.packing == "qkv_fused_conv1d" and c_attn.in_dim == 0
    n = adapter_for(tiny_config("gpt_neox"))
    qkv = next(s for s in n.tensors if s.name.endswith("query_key_value.weight"))
    assert qkv.packing == "qkv_interleaved" and qkv.in_dim == 1 and qkv.axes == ("heads", "hidden")


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2", "qwen3"])
def test_tiny_models_of_every_family_load_back(tmp_path: Path, tokenizer, family: str):
    from transformers import AutoModelForCausalLM

    from cbd_ray.tiny import save_tiny_model

    out = save_tiny_model(tmp_path / family, family, tokenizer=tokenizer, layers=2, hidden=32, heads=4)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tokenizer("def f(x): return x")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_gpt2_tokenizer_from_files_encodes_text(gpt2_tokenizer):
    ids = gpt2_tokenizer("Hello world")["input_ids"]
    assert ids == [15496, 995]

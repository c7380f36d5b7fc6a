"""Tiny models and tokenizers built in-process: tests, the demo and CI never reach a hub.

``tiny_config(family, ...)`` gives a Hugging Face config of any supported family at a toy
size; ``save_tiny_model`` writes a ``from_pretrained``-loadable directory (safetensors and
a tokenizer beside it). ``builtin_text()`` is English that ships with Python itself
(``pydoc_data.topics``), so the demo runs on a fresh machine without ../shared.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "qwen3")

SPECIAL_TOKENS = {"eos": "<|endoftext|>", "pad": "<|pad|>"}


def builtin_text() -> str:
    """About 460 kB of English prose from the Python documentation that ships with Python."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def builtin_instructions(n: int = 400, seed: int = 0) -> list[dict[str, str]]:
    """Instruction records (Dolly schema) made from Python's own topic docs: the instruction
    asks about a topic, the response is the first sentences of its documentation."""
    import random

    from pydoc_data import topics

    keys = sorted(topics.topics)
    rng = random.Random(seed)
    rng.shuffle(keys)
    out = []
    for k in keys[:n]:
        body = " ".join(topics.topics[k].split())
        response = body[:400].rsplit(" ", 1)[0]
        out.append({
            "instruction": f"Explain the Python topic '{k}'.",
            "context": "",
            "response": response,
            "category": "open_qa",
        })
    return out


def train_bpe_tokenizer(texts: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in about a second; returns a
    ``PreTrainedTokenizerFast`` with eos/pad tokens set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts if texts is not None else [builtin_text()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["pad"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL_TOKENS["eos"],
        bos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
    )


def gpt2_tokenizer(folder: str | os.PathLike):
    """The GPT-2 tokenizer from its files (``vocab.json``/``merges.txt``, or the original
    ``encoder.json``/``vocab.bpe`` names). transformers 5 silently ignores the old
    ``vocab_file=`` keywords and then encodes everything to [], so pass ``vocab=``/``merges=``."""
    from transformers import GPT2TokenizerFast

    folder = Path(folder)
    vocab = folder / "vocab.json" if (folder / "vocab.json").exists() else folder / "encoder.json"
    merges = folder / "merges.txt" if (folder / "merges.txt").exists() else folder / "vocab.bpe"
    tok = GPT2TokenizerFast(vocab=str(vocab), merges=str(merges))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok("hello world")["input_ids"]:
        raise RuntimeError(f"GPT-2 tokenizer from {folder} encodes text to nothing")
    return tok


def tiny_config(
    family: str,
    vocab_size: int = 512,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int | None = None,
    ffn: int | None = None,
    max_positions: int = 256,
    **extra: Any,
):
    """A Hugging Face config of ``family`` at a toy size (head_dim = hidden // heads)."""
    from transformers import (
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        Qwen2Config,
        Qwen3Config,
    )

    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    if hidden % heads:
        raise ValueError(f"heads={heads} does not divide hidden={hidden}")
    ffn = ffn or 4 * hidden
    kv_heads = kv_heads or heads
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_positions=max_positions, n_embd=hidden, n_layer=layers,
            n_head=heads, n_inner=ffn, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **extra,
        )
        cfg.architectures = ["GPT2LMHeadModel"]
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab_size, max_position_embeddings=max_positions, hidden_size=hidden,
            num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
            rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0, **extra,
        )
        cfg.architectures = ["GPTNeoXForCausalLM"]
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
        kw: dict[str, Any] = dict(
            vocab_size=vocab_size, max_position_embeddings=max_positions, hidden_size=hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            intermediate_size=ffn, tie_word_embeddings=family != "llama",
            bos_token_id=0, eos_token_id=0,
        )
        if family == "qwen3":
            kw["head_dim"] = hidden // heads
        kw.update(extra)
        cfg = cls(**kw)
        cfg.architectures = [
            {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
        ]
    return cfg


def make_tiny_model(family: str, seed: int = 0, **shape: Any):
    """A randomly initialised ``AutoModelForCausalLM`` of ``family`` (deterministic per seed)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # Random init leaves norms at 1 and biases at 0; perturb them so tests notice when a
    # resize drops or misplaces them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def save_tiny_model(out_dir: str | os.PathLike, family: str, tokenizer=None, seed: int = 0, **shape: Any) -> Path:
    """Build and save a tiny model (safetensors) with ``tokenizer`` beside it."""
    out = Path(out_dir)
    if tokenizer is not None:
        shape.setdefault("vocab_size", len(tokenizer))
    model = make_tiny_model(family, seed=seed, **shape)
    if tokenizer is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.bos_token_id = tokenizer.bos_token_id or tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        # generation stops at the generation config's EOS too (cbd_ray.generate.stop_ids)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = model.config.bos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        from cbd_ray.cards import fit_tokenizer

        fit_tokenizer(tokenizer, model.config).save_pretrained(out)
    return out

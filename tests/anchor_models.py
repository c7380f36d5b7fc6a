"""Tiny anchor pairs of every family for the interpolation tests (hidden <= 64, 2-4 layers,
head_dim 8 in both anchors of a pair)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from cbd_ray.interpolate import Shape
from cbd_ray.tiny import FAMILIES, save_tiny_model

GQA = ("llama", "qwen2", "qwen3")


def small_shape(family: str) -> Shape:
    return Shape(layers=2, hidden=32, heads=4, kv_heads=2 if family in GQA else None, ffn=64)


def large_shape(family: str) -> Shape:
    return Shape(layers=4, hidden=64, heads=8, kv_heads=4 if family in GQA else None, ffn=128)


def mid_shape(family: str) -> Shape:
    """A target between the small and the large anchor on every axis."""
    return Shape(3, 48, 6, 3 if family in GQA else None, 96)


def save(root: Path, family: str, shape: Shape, tokenizer, seed: int, name: str) -> Path:
    kw = {"kv_heads": shape.kv_heads} if shape.kv_heads is not None else {}
    return save_tiny_model(root / f"{family}-{name}", family, tokenizer, seed=seed, layers=shape.layers,
                           hidden=shape.hidden, heads=shape.heads, ffn=shape.ffn, **kw)


def make_anchors(root: Path, tokenizer, families=FAMILIES) -> dict[str, tuple[Path, Path]]:
    return {f: (save(root, f, small_shape(f), tokenizer, 1, "small"), save(root, f, large_shape(f), tokenizer, 2, "large"))
            for f in families}


def weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(d) / "model.safetensors"))


def logits(d: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=ids).logits

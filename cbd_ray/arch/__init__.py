"""Weight-layout adapters, one per model family; dispatch on ``config.architectures[0]``."""
from __future__ import annotations

from typing import Any

from cbd_ray.arch.base import ArchAdapter, Shape, TensorSpec
from cbd_ray.arch.gpt2 import GPT2Adapter
from cbd_ray.arch.gpt_neox import GPTNeoXAdapter
from cbd_ray.arch.llama import LlamaAdapter, Qwen2Adapter, Qwen3Adapter
from cbd_ray.errors import CBDError

ADAPTERS: dict[str, type[ArchAdapter]] = {
    arch: cls
    for cls in (GPT2Adapter, GPTNeoXAdapter, LlamaAdapter, Qwen2Adapter, Qwen3Adapter)
    for arch in cls.architectures
}
SUPPORTED: tuple[str, ...] = tuple(ADAPTERS)


def adapter_for(config: Any) -> ArchAdapter:
    """The layout adapter for a Hugging Face config (dispatch on ``architectures[0]``)."""
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise CBDError(f"config has no 'architectures' entry; supported: {', '.join(SUPPORTED)}")
    cls = ADAPTERS.get(archs[0])
    if cls is None:
        raise CBDError(f"architecture {archs[0]!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return cls(config)


__all__ = ["ArchAdapter", "Shape", "TensorSpec", "SUPPORTED", "adapter_for"]

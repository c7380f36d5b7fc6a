"""Accelerator selection: CUDA, Ascend NPU (torch-npu) or CPU.

torch-npu is imported only when NPUs are asked for: on machines without the Ascend
libraries even ``import torch`` fails with it installed.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

DeviceKind = Literal["auto", "cuda", "npu", "cpu"]
KINDS = ("auto", "cuda", "npu", "cpu")


@dataclass(frozen=True)
class DeviceSpec:
    kind: Literal["cuda", "npu", "cpu"]
    backend: str  # torch.distributed backend
    ray_resource: str | None  # per-worker Ray resource name, None for CPU

    def torch_device(self, local_rank: int = 0):
        import torch

        if self.kind == "cpu":
            return torch.device("cpu")
        return torch.device(f"{self.kind}:{local_rank}")

    @property
    def autocast_dtype(self):
        """bf16 autocast on accelerators; None (fp32) on CPU."""
        import torch

        return None if self.kind == "cpu" else torch.bfloat16


def npu_available() -> bool:
    return importlib.util.find_spec("torch_npu") is not None


def resolve(kind: str = "auto") -> DeviceSpec:
    """Turn a requested device kind into a spec; a clear error if it cannot be had."""
    if kind not in KINDS:
        raise ValueError(f"device {kind!r} is not one of {', '.join(KINDS)}")
    import torch

    if kind == "npu":
        if not npu_available():
            raise RuntimeError(
                "device 'npu' was requested but torch-npu is not installed; "
                "install the extra: pip install 'cbd-ray[npu]' on an Ascend machine"
            )
        import torch_npu  # noqa: F401  (registers the 'npu' device with torch)

        return DeviceSpec("npu", "hccl", "NPU")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device")
        return DeviceSpec("cuda", "nccl", "GPU")
    if kind == "auto" and torch.cuda.is_available():
        return DeviceSpec("cuda", "nccl", "GPU")
    return DeviceSpec("cpu", "gloo", None)

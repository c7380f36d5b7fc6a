"""Accelerator selection: CUDA, Ascend NPU (torch-npu) or CPU.

torch-npu is imported only when NPUs are asked for: on machines without the Ascend
libraries even ``import torch`` fails with it installed.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Literal

from cbd_ray.errors import CBDError

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


SPECS = {
    "cuda": DeviceSpec("cuda", "nccl", "GPU"),
    "npu": DeviceSpec("npu", "hccl", "NPU"),
    "cpu": DeviceSpec("cpu", "gloo", None),
}


def plan(kind: str, cluster: dict[str, float]) -> tuple[DeviceSpec, str]:
    """What to ask the Ray cluster for, decided from its resources (``ray.cluster_resources()``)
    on the driver, which needs no accelerator, CUDA or torch-npu of its own. Returns the spec
    and a sentence saying why. ``cuda``/``npu`` on a cluster without ``GPU``/``NPU`` resources
    is refused here, before any work; ``auto`` takes GPU, then NPU, then CPU."""
    if kind not in KINDS:
        raise ValueError(f"scaling.device {kind!r} is not one of {', '.join(KINDS)}")
    have = ", ".join(f"{k}={cluster.get(k, 0):g}" for k in ("CPU", "GPU", "NPU"))
    if kind in ("cuda", "npu"):
        spec = SPECS[kind]
        if cluster.get(spec.ray_resource, 0) < 1:
            raise CBDError(f"scaling.device={kind} needs the Ray resource {spec.ray_resource!r} but the cluster "
                             f"has {have}; start workers with it or use device=cpu")
        return spec, f"device {kind}: requested, the cluster has {have}"
    if kind == "cpu":
        return SPECS["cpu"], "device cpu: requested"
    for k in ("cuda", "npu"):
        if cluster.get(SPECS[k].ray_resource, 0) >= 1:
            return SPECS[k], f"device auto -> {k}: the cluster advertises {have}"
    return SPECS["cpu"], f"device auto -> cpu: the cluster advertises no GPU or NPU ({have})"


def worker_device(kind: str) -> Any:
    """The torch device of this Ray worker, resolved on the worker itself. CUDA: Ray Train's
    ``get_device()`` (the GPU Ray assigned). NPU: Ray sets ``ASCEND_RT_VISIBLE_DEVICES`` to the
    card(s) it assigned, so the worker's own card is always ``npu:0`` whatever its rank."""
    import torch

    if kind == "npu":
        resolve("npu")  # imports torch-npu here, on the worker, with a clear error if missing
        device = torch.device("npu:0")
        torch.npu.set_device(device)
        return device
    if kind == "cuda":
        if not torch.cuda.is_available():
            import socket

            raise RuntimeError(f"this Ray worker on {socket.gethostname()} was given a GPU resource but torch "
                               "sees no CUDA device (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


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

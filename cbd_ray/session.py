"""Joining Ray: one rule for every job and command.

``RAY_ADDRESS`` set (``ray job submit`` sets it; ``auto`` for a head started on this
machine): join that cluster, whose runtime env already reaches every worker. Otherwise start
a local Ray in this process — never attach to a stray cluster found on the machine by
accident (a stale ``/tmp/ray/ray_current_cluster`` would make ``ray.init()`` join it).
"""
from __future__ import annotations

import os

#: environment prefixes a fresh local Ray passes to its workers (offline hub, Ray settings)
_FORWARD = ("RAY_", "HF_", "TOKENIZERS_", "TORCH_EXTENSIONS")


def connect_ray(num_cpus: int | None = None) -> bool:
    """Connect to Ray as described above. True when this call connected (the caller shuts it
    down when done), False when Ray was already initialised."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return True
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARD) and k != "RAY_ADDRESS"}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env})
    return True

"""Wall time of the smoke chain (2 Ray Train workers per step) on a 3-node Ray cluster on
loopback (a head with no CPUs, two worker nodes with 2 CPUs each) against one local node
with 4 CPUs, side by side in one run on the same machine. Both clusters advertise the same
CPUs; on one physical machine the difference is the cost of the extra nodes (raylets, object
transfers between stores), not a speed-up.

    python bench/cluster_smoke.py [--out bench/out/cluster_smoke.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
       "RAY_DEDUP_LOGS": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
OVERRIDES = ["scaling.workers=2"]


def _run_chain(storage: str) -> float:
    from cbd_ray.schema import load_config
    from cbd_ray.stages.chain import run_chain

    cfg = load_config(ROOT / "configs" / "smoke.yaml", OVERRIDES)
    t0 = time.perf_counter()
    run_chain(cfg, storage=storage, log=lambda s: None)
    return time.perf_counter() - t0


def one_node(tmp: Path) -> float:
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=600 << 20,
             runtime_env={"env_vars": ENV})
    try:
        return _run_chain(str(tmp / "one"))
    finally:
        ray.shutdown()


def three_nodes(tmp: Path) -> float:
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "object_store_memory": 200 << 20})
    for _ in range(2):
        c.add_node(num_cpus=2, object_store_memory=200 << 20)
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env={"env_vars": ENV})
    try:
        return _run_chain(str(tmp / "three"))
    finally:
        ray.shutdown()
        c.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "cluster_smoke.json"))
    a = p.parse_args()
    os.environ.update(ENV)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t1 = one_node(tmp)
        t3 = three_nodes(tmp)
    load = os.getloadavg()
    res = {"one_node_s": round(t1, 1), "three_nodes_s": round(t3, 1), "ratio_three_over_one": round(t3 / t1, 3),
           "overrides": OVERRIDES, "cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in load]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"smoke chain, 2 workers/step: one node {t1:.1f}s, three nodes {t3:.1f}s "
          f"(x{t3 / t1:.2f}); load average {load[0]:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()

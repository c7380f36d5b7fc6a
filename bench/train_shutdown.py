"""How long Ray Train's ``fit()`` takes to return after the last ``report``, with Ray 2.60's
own PlacementGroupCleaner timeouts against the shorter ones cbd-ray sets
(``cbd_ray.session.PG_CLEANER_TIMEOUTS``), side by side in one run on one local Ray.
The training loop reports once and returns, so what is measured is start-up and shut-down.

    python bench/train_shutdown.py [--repeat 2] [--out bench/out/train_shutdown.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
       "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
RAY_DEFAULTS = {"get_actor_timeout_s": 10.0, "stop_timeout": None}  # Ray 2.60's, for the side-by-side


def _loop(config: dict) -> None:
    import ray.train

    ray.train.report({"step": 1})
    Path(config["stamp"]).write_text(str(time.time()))


def _fit(storage: str, name: str, stamp: str) -> tuple[float, float]:
    """(fit seconds, seconds from the loop's last report to fit() returning)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    TorchTrainer(_loop, train_loop_config={"stamp": stamp}, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(name=name, storage_path=storage)).fit()
    return time.perf_counter() - t0, time.time() - float(Path(stamp).read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "train_shutdown.json"))
    a = p.parse_args()
    os.environ.update(ENV)
    import ray

    from cbd_ray.session import PG_CLEANER_TIMEOUTS, shorten_train_shutdown

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=1 << 29)
    rows: dict[str, list[tuple[float, float]]] = {"ray_defaults": [], "cbd_ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeat):  # interleaved, so drift in machine load hits both alike
            for label, timeouts in (("ray_defaults", RAY_DEFAULTS), ("cbd_ray", PG_CLEANER_TIMEOUTS)):
                if not shorten_train_shutdown(timeouts):
                    sys.exit("this Ray's PlacementGroupCleanerCallback is not the one measured")
                rows[label].append(_fit(tmp, f"{label}-{i}", f"{tmp}/stamp"))
    ray.shutdown()
    res = {k: {"fit_s": round(statistics.mean(f for f, _ in v), 2),
               "after_report_s": round(statistics.mean(s for _, s in v), 2)} for k, v in rows.items()}
    res["fit_ratio_cbd_over_defaults"] = round(res["cbd_ray"]["fit_s"] / res["ray_defaults"]["fit_s"], 2)
    res["repeat"] = a.repeat
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

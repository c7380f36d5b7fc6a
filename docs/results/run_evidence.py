"""The command behind docs/results.md: jobs/reproduce.py on a Ray of its own.

    python docs/results/run_evidence.py [--cpus 1] [--shared ../shared/data] [override ...]

The machine it ran on is shared, so the run starts a local Ray limited to ``--cpus`` CPUs
in its own temp directory and sets RAY_ADDRESS to it, so nothing of it (Ray Train's
helpers included) attaches to another Ray on the machine. Paths to the shared data are
passed as overrides, so the config works from any checkout.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cpus", type=int, default=1)
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--config", default=str(ROOT / "configs" / "reproduce_evidence_cpu.yaml"))
    p.add_argument("--storage", default=str(ROOT / "runs"))
    p.add_argument("--ray-temp", default="/tmp/ray_cbd_evidence", help="Ray's temp directory (one per concurrent run)")
    p.add_argument("--as-is", action="store_true",
                   help="pass no data-path overrides (the config's ../shared/data paths hold from the project root)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith(("RAY_", "HF_", "TOKENIZERS_", "TORCH_EXTENSIONS"))}
    env["PYTHONPATH"] = str(ROOT)
    ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, object_store_memory=1 << 30,
             _temp_dir=a.ray_temp, runtime_env={"env_vars": env})
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    d = a.shared
    data = [] if a.as_is else [f"chain.data.instructions={d}/dolly/dolly_train_1k.jsonl", f"chain.data.text={d}/wikitext2/wiki.test.raw",
            f"chain.source.tiny.tokenizer.text={d}/wikitext2/wiki.test.raw",
            f"finetune.data={d}/tinyshakespeare/input.txt"]
    sys.path.insert(0, str(ROOT))
    from jobs.reproduce import main as reproduce

    return reproduce(["--config", a.config, "--storage", a.storage, *data, *a.overrides])


if __name__ == "__main__":
    sys.exit(main())

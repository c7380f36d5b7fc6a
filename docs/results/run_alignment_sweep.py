"""The α sweep with and without alignment in docs/results.md, on the evidence run's chain.

    python docs/results/run_alignment_sweep.py [--run runs/reproduce_evidence_cpu]

Pairs whose small anchor descends from the large one (the chain, ``init: prune``) and one
pair trained apart: an anchor of a2's shape started at random and distilled from a1 with
a2's own chain settings (the situation of public checkpoints). Every target of a pair is
interpolated at each α with ``align`` off and on and scored (loss at init) on the
validation split. Joins the Ray at $RAY_ADDRESS when set (e.g. the evidence run's own),
else starts a local one with one CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default=str(ROOT / "runs" / "reproduce_evidence_cpu"))
    p.add_argument("--config", default=str(ROOT / "configs" / "reproduce_evidence_cpu.yaml"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "alignment"))
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import ray

    from cbd_ray.baselines import init_direct_kd
    from cbd_ray.reproduce import alignment_sweep, load_reproduce_config
    from cbd_ray.stages.tune import chain_models, resize_fields

    env = {k: v for k, v in os.environ.items() if k.startswith(("RAY_", "HF_", "TOKENIZERS_", "TORCH_EXTENSIONS"))}
    env["PYTHONPATH"] = str(ROOT)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env})
    else:
        ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=1 << 30,
                 runtime_env={"env_vars": env})
    run = Path(a.run)
    _, chain_cfg = load_reproduce_config(a.config)
    chain = dict(chain_models(chain_cfg, run / "chain"))
    apart = run / "apart" / "a2_random"
    if not (apart / "config.json").is_file():
        shape = {k: v for k, v in chain_cfg.anchors[1].shape.model_dump().items() if k in ("layers", "hidden", "heads")}
        init_direct_kd(chain["a1"], shape, apart, run / "chain" / "data" / "train.jsonl", chain_cfg.step_distill(1),
                       eval_data=run / "chain" / "data" / "eval.jsonl", seed=0, work_dir=run / "apart" / "work",
                       overwrite=True, log=print)
    t = {x.label: {"name": x.label, "shape": {k: getattr(x, k) for k in ("layers", "hidden", "heads", "ffn")}}
         for x in chain_cfg.grid.targets}
    pairs = [
        {"name": "source>a1 (pruned)", "large": chain["source"], "small": chain["a1"], "targets": [t["t-6x112"]]},
        {"name": "a1>a2 (pruned)", "large": chain["a1"], "small": chain["a2"], "targets": [t["t-5x80"], t["t-4x80"]]},
        {"name": "a2>a3 (pruned)", "large": chain["a2"], "small": chain["a3"], "targets": [t["t-4x48"]]},
        {"name": "a1>a2 (trained apart)", "large": chain["a1"], "small": str(apart),
         "targets": [t["t-5x80"], t["t-4x80"]]},
    ]
    alignment_sweep(pairs, run / "reproduce" / "data" / "val.txt", a.out, resize=resize_fields(chain_cfg, run / "chain"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

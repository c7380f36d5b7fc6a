"""A DeepSpeed run killed after a checkpoint and started again ends where an uninterrupted
run ends: the figure of issue 14's DeepSpeed bug, measured again.

One process (world size 1, gloo, CPU): for each ZeRO stage, an uninterrupted ``kd`` run of
``--steps`` steps, and the same run with its first attempt failing after the step-``--cut``
checkpoint, then started again. Prints one JSON line per stage: the losses of the first two
steps after the resume next to the uninterrupted run's, and the largest absolute difference
between the two final students' weights (before the fix: step 22's loss jumped back to the
level of step 1 and the students differed by up to 0.053).

    python bench/deepspeed_resume.py --steps 40 --cut 20 --out docs/bench_deepspeed_resume_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cut", type=int, default=20)
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    from safetensors.torch import load_file

    from cbd_ray.tiny import train_bpe_tokenizer
    from cbd_ray.train import DistillConfig, train_loop_per_worker
    from distill_models import DOLLY_TRAIN, make_pair

    work = Path(tempfile.mkdtemp(prefix="cbd_ds_resume_"))
    teacher, student = make_pair(work, train_bpe_tokenizer(vocab_size=512))
    rows = []
    for stage in (int(s) for s in args.stages.split(",")):
        cfg = DistillConfig(objective="kd", divergence="fkl", steps=args.steps, batch_size=4, micro_batch=2, max_len=64,
                            lr=3e-3, checkpoint_every=args.cut, data_limit=64, log_every=0, device="cpu",
                            deepspeed=stage)
        base = {"cfg": cfg.model_dump(), "teacher_dir": str(teacher), "student_dir": str(student),
                "data": str(ROOT.parent / "shared" / "data" / DOLLY_TRAIN)}
        full = train_loop_per_worker({**base, "run_dir": str(work / f"full{stage}")})
        cut = {**base, "cfg": {**base["cfg"], "fail_at_step": args.cut + 1}, "run_dir": str(work / f"cut{stage}")}
        try:
            train_loop_per_worker(cut)
        except RuntimeError:
            pass
        again = train_loop_per_worker(cut)
        a = load_file(work / f"full{stage}" / "checkpoints" / f"step_{args.steps}" / "model" / "model.safetensors")
        b = load_file(work / f"cut{stage}" / "checkpoints" / f"step_{args.steps}" / "model" / "model.safetensors")
        row = {"zero": stage, "steps": args.steps, "resumed_at": args.cut,
               "uninterrupted_losses_after_cut": [h["loss"] for h in full["history"][args.cut:args.cut + 2]],
               "resumed_losses": [h["loss"] for h in again["history"][:2]],
               "step_1_loss": full["history"][0]["loss"],
               "max_abs_weight_diff": max(float((a[k] - b[k]).abs().max()) for k in a)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": "2-core CPU, no GPU", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

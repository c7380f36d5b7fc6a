"""The chain's ``baselines`` stage: what a user would do instead of the chain, per target.

For every grid target (``evaluation.baselines``):

``prune``      the source cut straight to the target's shape by the grid's subset rules
``direct_kd``  a random initialisation of the target's shape distilled straight from the
               source with the first chain step's settings (cbd_ray.baselines.init_direct_kd)

Each is scored on the same held-out windows as the evaluate stage (mean token NLL), and the
teacher tokens Direct KD spent are measured per target. They are recorded as
``direct_kd_teacher_tokens``, not as the stage's ``teacher_tokens``, so the chain's own
teacher cost stays the chain's. Writes ``baselines.json`` (one row per target and method).
"""
from __future__ import annotations

import json
import shutil
from typing import Any, Callable

from cbd_ray.pipeline import StageContext
from cbd_ray.schema import ChainConfig, with_chain_text


def baselines_stage(cfg: ChainConfig, source_stage: str) -> Callable[[StageContext], dict[str, Any]]:
    def fn(ctx: StageContext) -> dict[str, Any]:
        from cbd_ray.baselines import init_direct_kd, init_prune
        from cbd_ray.stages.grid_settings import resize_options
        from cbd_ray.stages.heldout import heldout_eval
        from cbd_ray.stages.models import model_dir_of

        e = cfg.evaluation
        ctx.out.mkdir(parents=True)
        source = model_dir_of(ctx.inputs[source_stage])
        data = ctx.inputs["data"]
        text = (data / "text_heldout.txt").read_text()
        resize = resize_options(cfg, data)
        rows: list[dict[str, Any]] = []
        for t in cfg.grid.targets:
            shape = {k: getattr(t, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn") if getattr(t, k)}
            for method in e.baselines:
                out = ctx.work / t.label / method
                row: dict[str, Any] = {"target": t.label, "method": method, "teacher_tokens": 0}
                if method == "prune":
                    init_prune(source, shape, out, resize=resize, overwrite=True)
                else:
                    work = ctx.work / t.label / "kd_work"
                    init_direct_kd(source, shape, out, data / "train.jsonl",
                                   with_chain_text(cfg.step_distill(0), str(data / "text_train.txt")),
                                   eval_data=data / "eval.jsonl", seed=cfg.run.seed, work_dir=work, overwrite=True,
                                   log=ctx.log)
                    shutil.rmtree(work, ignore_errors=True)
                    info = json.loads((out / "baseline.json").read_text())
                    row["teacher_tokens"] = int((info.get("metrics") or {}).get("teacher_tokens") or 0)
                r = heldout_eval(str(out), text, e.heldout_windows, e.max_length, cfg.run.seed, [], None, None)
                row.update(params=r["params"], heldout_nll=r["heldout_nll"])
                ctx.log(f"baselines: {t.label:>12} {method:<9} held-out NLL {r['heldout_nll']:.3f}")
                rows.append(row)
                shutil.rmtree(out, ignore_errors=True)  # only the scores are kept
        (ctx.out / "baselines.json").write_text(json.dumps(rows, indent=2) + "\n")
        kd = sum(r["teacher_tokens"] for r in rows)
        return {"rows": len(rows), "direct_kd_teacher_tokens": kd, "teacher_tokens": 0, "student_tokens": 0}

    return fn

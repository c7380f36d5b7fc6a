"""The chain's ``evaluate`` stage: every anchor and grid target scored on the held-out text.

Each model's held-out loss (mean token NLL, nats) is measured beside a random initialisation
of its own config, then any evaluation tasks (``evaluation.tasks``); one Ray task per model
(:func:`heldout_eval`, also what the ``baselines`` stage scores its models with). Writes
``evaluation.json``. (``cbd evaluate-many`` is :mod:`cbd_ray.stages.evaluate`.)
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from cbd_ray.pipeline import StageContext
from cbd_ray.schema import ChainConfig
from cbd_ray.stages.worker import accel, model_ref


def heldout_eval(model_dir: Any, text: str, windows: int, max_length: int | None, seed: int,
                 tasks: list[str], data_dir: str | None, limit: int | None, device: str = "cpu") -> dict[str, Any]:
    """Held-out loss (mean token NLL, nats) of a model and of a random initialisation of the
    same config; then any evaluation tasks. Runs as one Ray task per model."""
    import torch
    from transformers import AutoModelForCausalLM

    from cbd_ray.evaluate import evaluate_loaded, load_model, perplexity
    from cbd_ray.storage import materialize

    name = Path(model_dir["uri"].partition("?")[0]).name if isinstance(model_dir, dict) else Path(model_dir).name
    model_dir = str(materialize(model_dir))  # a storage reference: fetched into this node's cache
    model, tok = load_model(model_dir, device)
    n_params = sum(p.numel() for p in model.parameters())
    res = perplexity(model, tok, text, max_length=max_length, max_windows=windows)
    torch.manual_seed(seed)
    rnd = AutoModelForCausalLM.from_config(model.config).to(model.device, model.dtype).eval()
    rres = perplexity(rnd, tok, text, max_length=max_length, max_windows=windows)
    out: dict[str, Any] = {"params": int(n_params), "heldout_nll": res["nll"], "heldout_ppl": res["ppl"],
                           "random_nll": rres["nll"], "random_ppl": rres["ppl"], "tokens": int(res["tokens"])}
    real = [t for t in tasks if t != "heldout"]
    if real:
        out["tasks"] = evaluate_loaded(model, tok, real, data_dir=data_dir, limit=limit, progress=False,
                                       model_name=name)
    return out


def evaluate_stage(cfg: ChainConfig, chain_stages: list[str]) -> Callable[[StageContext], dict[str, Any]]:
    def fn(ctx: StageContext) -> dict[str, Any]:
        import ray

        ctx.out.mkdir(parents=True)
        e = cfg.evaluation
        text = (ctx.inputs["data"] / "text_heldout.txt").read_text()
        names = ["source"] + [a.name for a in cfg.anchors]
        models: list[dict[str, Any]] = [
            {"model": n, "kind": "anchor", "path": model_ref(ctx, s)} for n, s in zip(names, chain_stages)]
        grid_dir = ctx.inputs["grid"]
        for r in json.loads((grid_dir / "targets.json").read_text()):
            models.append({"model": r["name"], "kind": "target", "path": ctx.ref("grid", sub=r["path"]),
                           "alpha": r.get("alpha"), "pair": f"{r.get('large')} > {r.get('small')}"})
        kind, opts = accel(cfg)
        args = (text, e.heldout_windows, e.max_length, cfg.run.seed, list(e.tasks), e.data_dir, e.limit, kind)
        t0 = time.perf_counter()
        if ray.is_initialized():
            # max_retries: a task lost with its node is run again elsewhere (evaluation is pure)
            task = ray.remote(heldout_eval).options(**{**opts, "num_cpus": e.cpus_per_task}, max_retries=2)
            refs = [task.remote(m["path"], *args) for m in models]
            results = []
            for m, ref in zip(models, refs):
                results.append(ray.get(ref))
                ctx.log(f"evaluate: {m['model']} done ({time.perf_counter() - t0:.1f}s)")
        else:
            results = [heldout_eval(m["path"], *args) for m in models]
        rows = []
        for m, r in zip(models, results):
            row = {k: v for k, v in m.items() if k != "path"}
            row.update(r)
            rows.append(row)
            ctx.log(f"evaluate: {m['model']:>16} {m['kind']:6} {r['params']:>12,} params  held-out NLL "
                    f"{r['heldout_nll']:.3f}  (random init {r['random_nll']:.3f})")
        (ctx.out / "evaluation.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
        targets = [r for r in rows if r["kind"] == "target"]
        better = sum(r["heldout_nll"] < r["random_nll"] for r in targets)
        return {"models": len(rows), "targets_better_than_random": better, "targets": len(targets),
                "student_tokens": 0, "teacher_tokens": 0}

    return fn

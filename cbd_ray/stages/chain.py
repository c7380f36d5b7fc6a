"""The chain job as stages over a manifest (cbd_ray.pipeline).

Stages, in order (names are what ``--from-stage`` takes)::

    data          instruction records and text, split into train / eval / held-out files
    teacher       (bridge) the heterogeneous teacher: a checkpoint, or a tiny model pretrained here
    teacher_sft   (bridge, optional) SFT of the teacher on the instructions
    bridge_data   (bridge) the teacher answers the prompts (Ray Data actor pool) -> dataset
    source        the top of the chain: a checkpoint, or a tiny model pretrained here
    source_sft    (optional) SFT of the source on the instructions
    bridge        (bridge) SeqKD fine-tune of the source on the teacher's answers
    <anchor>_sft  (optional, per anchor: ``anchors[k].sft``) SFT of anchor k's start (its
                  checkpoint, or its pruned or random start) on the instructions, before chain_k
    chain_1..K    Ray Train distillation of anchor k from its predecessor
    grid          interpolation of every target between the adjacent pair that brackets it
    evaluate      held-out loss of every model and of random initialisation of its shape
    report        report.md, plots and the teacher-cost table

:func:`run_chain` checks the storage root and the run directory first, then runs the
stages on the current Ray (or a local one).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from cbd_ray.config import build
from cbd_ray.errors import CBDError, ConfigError
from cbd_ray.manifest import Manifest
from cbd_ray.pipeline import RunDirConflict, Stage, StageContext, run_stages
from cbd_ray.schema import ChainConfig, ModelSpec, config_hash, target_pair
from cbd_ray.session import connect_ray
from cbd_ray.stages.models import model_dir_of

Log = Callable[[str], None]
logger = logging.getLogger(__name__)


def _say(s: str) -> None:
    logger.info("%s", s)


# ---------------------------------------------------------------------- data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_records(spec: str, limit: int | None, builtin_count: int, seed: int) -> list[dict[str, Any]]:
    """Instruction records: ``builtin`` (from Python's docs), a local JSONL/Parquet file or a
    hub dataset name (cbd_ray.data.read_instructions)."""
    if spec == "builtin":
        from cbd_ray.tiny import builtin_instructions

        recs = builtin_instructions(builtin_count, seed=seed)
        return recs[:limit] if limit else recs
    try:
        from cbd_ray.data import read_instructions
    except ImportError:
        read_instructions = None
    if read_instructions is not None:
        recs = read_instructions(spec, limit)
        return [dict(r) for r in recs]
    p = Path(spec)
    if not p.is_file():
        raise FileNotFoundError(f"instruction data {spec!r} not found")
    recs = _read_jsonl(p)
    return recs[:limit] if limit else recs


def data_stage(cfg: ChainConfig) -> Callable[[StageContext], dict[str, Any]]:
    def fn(ctx: StageContext) -> dict[str, Any]:
        from cbd_ray.stages.models import read_text_source
        from cbd_ray.storage import atomic_write_text

        d = cfg.data
        ctx.out.mkdir(parents=True)
        recs = read_records(d.instructions, d.limit, d.builtin_count, cfg.run.seed)
        if d.eval_instructions:
            train, evalr = recs, read_records(d.eval_instructions, None, d.builtin_count, cfg.run.seed + 1)
        else:
            n_eval = max(1, int(len(recs) * d.eval_fraction))
            train, evalr = recs[:-n_eval], recs[-n_eval:]
        if not train or not evalr:
            raise CBDError(f"data.instructions gives {len(recs)} records: too few to split train/eval")
        _write_jsonl(ctx.out / "train.jsonl", train)
        _write_jsonl(ctx.out / "eval.jsonl", evalr)
        text = read_text_source(d.text, recs)
        cut = int(len(text) * (1 - d.heldout_fraction))
        vcut = int(len(text) * (1 - d.heldout_fraction - d.val_fraction)) if d.val_fraction else cut
        atomic_write_text(ctx.out / "text_train.txt", text[:vcut])
        if d.val_fraction:  # between training and held-out text: neither trained on nor reported
            atomic_write_text(ctx.out / "text_val.txt", text[vcut:cut])
        atomic_write_text(ctx.out / "text_heldout.txt", text[cut:])
        ctx.log(f"data: {len(train)} train / {len(evalr)} eval records, text {vcut:,} + "
                f"{cut - vcut:,} validation + {len(text) - cut:,} held-out chars")
        return {"train_records": len(train), "eval_records": len(evalr), "text_chars": len(text)}

    return fn


# ---------------------------------------------------------------------- models


def _accel(cfg: ChainConfig) -> tuple[str, dict[str, Any]]:
    """(device kind, Ray task options) of a single-model task, decided from the cluster's
    resources on the driver (which needs no accelerator): ``auto`` takes what the cluster
    has; ``cuda``/``npu`` on a cluster without it is refused before any work."""
    import ray

    from cbd_ray import devices

    if not ray.is_initialized():
        kind = "cpu" if cfg.scaling.device in ("auto", "cpu") else cfg.scaling.device
        return kind, {}
    spec, _ = devices.plan(cfg.scaling.device, ray.cluster_resources())
    opts: dict[str, Any] = {"num_cpus": cfg.scaling.cpus_per_worker}
    if spec.kind == "cuda":
        opts["num_gpus"] = 1
    elif spec.kind == "npu":
        opts["resources"] = {"NPU": 1}
    return spec.kind, opts


def _produce(cfg: ChainConfig, ctx: StageContext, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(out_dir, device, *args)`` as one Ray task on one worker's resources (a CPU
    slot, a GPU or an NPU), or in-process without Ray; the directory it writes becomes the
    stage's output. With a remote run directory the worker writes a local directory of its
    own and uploads it to ``work/<stage>/shipped``, from where the driver fetches it: the
    worker never sees a driver path."""
    import ray

    kind, opts = _accel(cfg)
    if not ray.is_initialized():
        return fn(str(ctx.out), kind, *args)
    task = ray.remote(_ship_task).options(max_retries=0, **opts)
    ship = ctx.uri("work", ctx.name, "shipped") if ctx.remote else None
    out = None if ctx.remote else str(ctx.out)
    metrics = ray.get(task.remote(fn, out, ship, kind, *args))
    if ship is not None:
        from cbd_ray.storage import delete_dir, download_dir

        download_dir(ship, ctx.out)
        delete_dir(ship)
    return metrics


def _ship_task(fn: Callable[..., Any], out: str | None, ship: str | None, kind: str, *args: Any) -> Any:
    """The worker side of :func:`_produce`."""
    import shutil
    import tempfile

    from cbd_ray.storage import delete_dir, upload_dir

    if ship is None:
        return fn(out, kind, *args)
    tmp = Path(tempfile.mkdtemp(prefix="cbd_produce_"))
    try:
        metrics = fn(str(tmp / "out"), kind, *args)
        delete_dir(ship)
        upload_dir(tmp / "out", ship)
        return metrics
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pretrain_task(out: str, device: str, init: Any, text: str, work: str | None, *rest: Any) -> dict[str, Any]:
    """Pretrain the tiny model ``init`` (a path or storage reference) into ``out``."""
    import tempfile

    from cbd_ray.stages.models import pretrain_lm
    from cbd_ray.storage import materialize

    work = work or tempfile.mkdtemp(prefix="cbd_pretrain_")  # remote runs: no resume of this stage
    return pretrain_lm(str(materialize(init)), text, out, work, *rest, device=device)


def model_stage(cfg: ChainConfig, spec: ModelSpec, role: str) -> Callable[[StageContext], dict[str, Any]]:
    """Prepare a model: fetch a checkpoint, or build a tiny one and pretrain it on text."""

    def fn(ctx: StageContext) -> dict[str, Any]:
        from cbd_ray.stages.models import fetch_checkpoint, init_tiny, read_text_source

        if spec.model is not None:
            ref = fetch_checkpoint(spec.model, ctx.out, copy=ctx.remote)
            ctx.log(f"{role}: {ref['model']}")
            return {"model": ref["model"], "student_tokens": 0, "teacher_tokens": 0}
        t = spec.tiny
        assert t is not None
        data = ctx.inputs["data"]
        recs = _read_jsonl(data / "train.jsonl")
        init = ctx.work / "init"
        if not (init / "config.json").is_file():
            tok_text = read_text_source(t.tokenizer.text, recs)
            init_tiny(init, t.family, t.shape.model_dump(), tok_text, t.tokenizer.vocab_size, t.max_positions, t.seed)
        text = (data / "text_train.txt").read_text()
        p = t.pretrain
        ctx.log(f"{role}: tiny {t.family} {t.shape.layers}x{t.shape.hidden}x{t.shape.heads}, "
                f"pretraining {p.steps} steps on {len(text):,} chars")
        metrics = _produce(cfg, ctx, _pretrain_task, ctx.publish(init, "init"), text,
                           None if ctx.remote else str(ctx.work),
                           p.steps, p.batch_size, p.seq_len, p.lr, p.checkpoint_every, t.seed)
        return {**metrics, "model": None}

    return fn


# ---------------------------------------------------------------------- distillation


def model_ref(ctx: StageContext, name: str) -> Any:
    """What a worker gets for the model input ``name``: a storage reference to the stage's
    directory when it holds the model, else the reference it recorded (a hub name, or a
    directory that must then be shared)."""
    if (ctx.inputs[name] / "config.json").is_file():
        return ctx.ref(name)
    return model_dir_of(ctx.inputs[name])


def distill_config(settings: dict[str, Any], where: str) -> Any:
    from cbd_ray.train import DistillConfig

    return build(DistillConfig, settings, source=where)


def _distill_metrics(m: Any) -> dict[str, Any]:
    """The engine's metrics, JSON-safe, with student/teacher token counts as ints."""
    out = json.loads(json.dumps(dict(m or {}), default=str))
    for k in ("student_tokens", "teacher_tokens"):
        out[k] = int(out.get(k) or 0)
    return out


def distill_stage(cfg: ChainConfig, settings: dict[str, Any], where: str, teacher: str | None, student: str,
                  data_file: str = "train.jsonl", data_input: str = "data",
                  init: dict[str, Any] | None = None) -> Callable[[StageContext], dict[str, Any]]:
    """A Ray Train run of cbd_ray.train.run_distill: ``student`` (an input stage whose model
    is the starting point, unless ``init`` says to start from a checkpoint or at random)
    learns from ``teacher`` (an input stage, or None for SFT). ``student`` need not be an
    input when ``init`` starts from a checkpoint (an anchor's SFT reads only the data).
    Checkpoints live in the stage's work directory, so a cut-short run resumes from its last
    one. A model pruned from its parent, or trained from such a model, records its descent
    (cbd_ray.align's ``lineage.json``)."""

    def fn(ctx: StageContext) -> dict[str, Any]:
        from cbd_ray.train import run_distill

        dcfg = distill_config(settings, where)
        teacher_ref = model_ref(ctx, teacher) if teacher else None
        parent = model_dir_of(ctx.inputs[student]) if student in ctx.inputs else None
        student_ref = model_ref(ctx, student) if parent is not None else None
        init_info: dict[str, Any] = {}
        if init is not None:
            start, init_info = start_anchor(cfg, init, parent or "", ctx)
            student_ref = start if init_info["init"] == "checkpoint" else ctx.publish(Path(start), "init")
        data = ctx.inputs[data_input] / data_file  # read on the driver; workers get it through Ray Data
        lm_ref = _lm_corpus(ctx, dcfg, student_ref)
        ctx.log(f"{ctx.name}: {dcfg.objective} {teacher or '(no teacher)'} -> {student} on {data.name}")
        m = run_distill(teacher_ref if teacher_ref is not None else student_ref, student_ref, str(data), str(ctx.out),
                        dcfg, eval_data=ctx.ref("data", file="eval.jsonl"), storage_path=ctx.uri("work", ctx.name, "ray_train"),
                        max_failures=cfg.scaling.max_failures, name=ctx.name, log=ctx.log, lm_data=lm_ref)
        if m.get("restarts"):
            ctx.log(f"{ctx.name}: finished after {m['restarts']} worker-group restart(s) from checkpoints")
        if parent is not None and _descends(init_info, init, parent):
            from cbd_ray.align import write_lineage

            write_lineage(ctx.out, student_dir=parent)
        return {**_distill_metrics(m), **init_info}

    return fn


def _descends(init_info: dict[str, Any], init: dict[str, Any] | None, student_dir: str) -> bool:
    """Whether a trained model descends from ``student_dir`` for cbd_ray.align: it started as
    that model pruned, or it trained that model further (no ``init``) and that model descends
    from a parent itself (an anchor's SFT of its pruned start)."""
    from cbd_ray.align import LINEAGE

    if init_info.get("init") == "prune":
        return True
    return init is None and (Path(student_dir) / LINEAGE).is_file()


def _lm_corpus(ctx: StageContext, dcfg: Any, tokenizer_ref: Any) -> Any:
    """MiniLLM's pretraining text (``lm_data``: a path on the driver or any URI) as a token
    corpus in the run directory's ``corpora/``, tokenised by Ray Data the first time and
    reused by every later chain step, rerun and driver (cbd_ray.corpus): nothing is copied
    per stage and no worker reads the whole text."""
    from cbd_ray.train import lm_corpus

    return lm_corpus(dcfg, None, tokenizer_ref, ctx.uri("corpora"), say=ctx.log)


def start_anchor(cfg: ChainConfig, init: dict[str, Any], parent_dir: str, ctx: StageContext) -> tuple[str, dict[str, Any]]:
    """Where an anchor's distillation starts (``init["init"]``: checkpoint | prune | random)
    and what to record about it in the stage's metrics. ``prune`` cuts the parent (the
    previous chain model) to the anchor's shape with the project's subset rules
    (cbd_ray.resize; importance from calibration text of the chain's train.jsonl), so the
    anchor descends from its parent and shares its channel order."""
    kind = init.get("init") or ("checkpoint" if init.get("model") else "prune")
    if kind == "checkpoint":
        return str(init["model"]), {"init": "checkpoint", "init_from": str(init["model"])}
    start = ctx.work / "init"
    info: dict[str, Any] = {"init": kind, "init_from": Path(parent_dir).name if kind == "prune" else None}
    if kind == "random":
        from cbd_ray.stages.models import random_like

        if not (start / "config.json").is_file():
            random_like(parent_dir, start, cfg.family or "gpt2", init["shape"], init["seed"])
        return str(start), info
    from cbd_ray.interpolate import ResizeOptions, load_calib_texts, resize_model

    texts = load_calib_texts(ctx.inputs["data"] / "train.jsonl", limit=64)
    opts = ResizeOptions(calib_texts=texts) if texts else ResizeOptions()
    if not (start / "config.json").is_file():
        shape = {k: v for k, v in init["shape"].items() if k in ("layers", "hidden", "heads", "kv_heads", "ffn")}
        resize_model(parent_dir, shape, start, resize=opts, overwrite=True)
    info["init_resize"] = opts.describe()
    ctx.log(f"{ctx.name}: starts as {Path(parent_dir).name} pruned to {init['shape']} "
            f"({info['init_resize']['width_subset']} widths, {info['init_resize']['layer_subset']} layers)")
    return str(start), info


def bridge_data_stage(cfg: ChainConfig, teacher: str) -> Callable[[StageContext], dict[str, Any]]:
    def fn(ctx: StageContext) -> dict[str, Any]:
        from cbd_ray.stages.bridge import generate_answers

        assert cfg.bridge is not None
        g = cfg.bridge.generation
        recs = _read_jsonl(ctx.inputs["data"] / "train.jsonl")
        if g.prompts:
            recs = recs[: g.prompts]
        device = cfg.scaling.device  # generate_answers asks Ray for a GPU or NPU per actor, as the cluster has
        return generate_answers(
            model_ref(ctx, teacher), recs, ctx.out, max_new_tokens=g.max_new_tokens,
            batch_size=g.batch_size, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, actors=g.actors,
            gpus_per_actor=g.gpus_per_actor, cpus_per_actor=g.cpus_per_actor, device=device, seed=cfg.run.seed,
            log=ctx.log,
        )

    return fn


# ---------------------------------------------------------------------- grid


def grid_stage(cfg: ChainConfig, chain_stages: list[str]) -> Callable[[StageContext], dict[str, Any]]:
    """Every target between the adjacent chain pair that brackets it (one run_grid per pair)."""

    def fn(ctx: StageContext) -> dict[str, Any]:
        from cbd_ray.grid import run_grid

        ctx.out.mkdir(parents=True)
        names = ["source"] + [a.name for a in cfg.anchors]
        groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for t in cfg.grid.targets:
            pair = target_pair(cfg, t)
            if pair is None:  # validation guarantees a pair when shapes are known
                raise ConfigError(f"grid target {t.label} lies outside every adjacent anchor pair")
            groups.setdefault(pair, []).append(
                {"name": t.label, "layers": t.layers, "hidden": t.hidden, "heads": t.heads,
                 "kv_heads": t.kv_heads, "ffn": t.ffn, "alpha": t.alpha})
        resize = _resize_options(cfg, ctx)
        searched = search_target_alphas(cfg, ctx, groups, chain_stages, resize) if cfg.grid.alpha == "search" else {}
        default_alpha = "auto" if cfg.grid.alpha in ("best", "search") else cfg.grid.alpha
        records: list[dict[str, Any]] = []
        for (hi, lo), targets in groups.items():
            large = model_ref(ctx, chain_stages[hi])
            small = model_ref(ctx, chain_stages[lo])
            ctx.log(f"grid: {len(targets)} target(s) between {names[hi]} and {names[lo]}")
            targets = [{**{k: v for k, v in t.items() if v is not None},
                        **({"alpha": searched[t["name"]]["alpha"]} if t["name"] in searched else {})} for t in targets]
            recs = run_grid(small, large, targets, str(ctx.out), alpha=default_alpha, resize=resize,
                            num_actors=cfg.grid.actors, overwrite=False, progress=True, log=ctx.log,
                            ship_uri=ctx.uri("work", ctx.name, "shipped") if ctx.remote else None)
            (ctx.out / "grid.json").rename(ctx.out / f"grid_{names[hi]}__{names[lo]}.json")
            for r in recs:
                r.update(large=names[hi], small=names[lo])
                if r["name"] in searched:
                    r["alpha_search"] = searched[r["name"]]
                if r.get("path"):
                    r["path"] = Path(r["path"]).name  # relative to the stage's directory
            records += recs
        failed = [r for r in records if r.get("status") != "ok"]
        (ctx.out / "targets.json").write_text(json.dumps(records, indent=2, default=str) + "\n")
        if failed:
            raise CBDError("grid targets failed: " + "; ".join(f"{r['name']}: {r.get('error')}" for r in failed))
        return {"targets": len(records), "student_tokens": 0, "teacher_tokens": 0,
                "seconds": sum(float(r.get("seconds") or 0) for r in records),
                **({"alpha_search": searched} if searched else {})}

    return fn


def search_target_alphas(cfg: ChainConfig, ctx: StageContext, groups: dict[tuple[int, int], list[dict[str, Any]]],
                   chain_stages: list[str], resize: Any) -> dict[str, dict[str, Any]]:
    """``grid.alpha: search``: the α of every target without its own, chosen among
    grid.search_alphas (0 and 1 always included) by loss on the chain's validation text only
    (cbd_ray.alpha_search); {target name: {"alphas", "val_losses", "alpha", "val_loss"}}.
    One task per target, on Ray when it is running (the blends are scored where they are made)."""
    import ray

    from cbd_ray.alpha_search import read_validation, search_alpha

    text = read_validation(ctx.inputs["data"])
    g = cfg.grid
    jobs = [(t, model_ref(ctx, chain_stages[lo]), model_ref(ctx, chain_stages[hi]))
            for (hi, lo), targets in groups.items() for t in targets if t.get("alpha") is None]
    kind, opts = _accel(cfg)
    t0 = time.perf_counter()
    out: dict[str, dict[str, Any]] = {}
    shape_keys = ("layers", "hidden", "heads", "kv_heads", "ffn")

    def args(t: dict[str, Any], small: Any, large: Any) -> tuple[Any, ...]:
        return (small, large, {k: t[k] for k in shape_keys}, g.search_alphas, text, g.search_windows,
                g.search_seq_len, resize, kind)

    if ray.is_initialized():
        task = ray.remote(search_alpha).options(**opts, max_retries=2)  # pure: a lost task runs again
        refs = [task.remote(*args(*j)) for j in jobs]
        results = [ray.get(r) for r in refs]
    else:
        results = [search_alpha(*args(*j)) for j in jobs]
    for (t, _, _), res in zip(jobs, results):
        out[t["name"]] = res
        losses = ", ".join(f"{a:g}: {v:.3f}" for a, v in zip(res["alphas"], res["val_losses"]))
        ctx.log(f"grid: {t['name']} α search on validation text ({losses}) -> α {res['alpha']:g}")
    ctx.log(f"grid: α search of {len(jobs)} target(s) took {time.perf_counter() - t0:.1f}s")
    return out


def _resize_options(cfg: ChainConfig, ctx: StageContext) -> Any:
    import dataclasses

    from cbd_ray.interpolate import ResizeOptions

    r = cfg.grid.resize.model_dump()
    calib = r.pop("calib")
    allowed = {f.name for f in dataclasses.fields(ResizeOptions)}
    kw = {k: v for k, v in r.items() if k in allowed}
    if calib and "calib_texts" in allowed:
        recs = _read_jsonl(ctx.inputs["data"] / "train.jsonl")[:32]
        kw["calib_texts"] = [f"{x['instruction']}\n{x['response']}" for x in recs]
    return ResizeOptions(**kw)


# ---------------------------------------------------------------------- evaluation


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
        kind, opts = _accel(cfg)
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


def report_stage(cfg: ChainConfig) -> Callable[[StageContext], dict[str, Any]]:
    def fn(ctx: StageContext) -> dict[str, Any]:
        from cbd_ray.stages.summary import write_run_report

        ctx.out.mkdir(parents=True)
        path = write_run_report(ctx.run_dir, manifest=Manifest.load(ctx.run_dir), evaluation_dir=ctx.inputs["evaluate"],
                                grid_dir=ctx.inputs["grid"], out_dir=ctx.out)
        return {"report": str(path.relative_to(ctx.run_dir)), "student_tokens": 0, "teacher_tokens": 0}

    return fn


# ---------------------------------------------------------------------- the stage list


def build_stages(cfg: ChainConfig) -> list[Stage]:
    """The chain's stages in order, each with its own config slice (what its hash covers)."""
    seed = cfg.run.seed
    data_cfg = cfg.data.model_dump(mode="json", exclude=None if cfg.data.val_fraction else {"val_fraction"})
    stages = [Stage("data", data_stage(cfg), config={"data": data_cfg, "seed": seed},
                    output="data")]
    base = {**cfg.scaling_distill(), **cfg.distill}

    def model_then_sft(name: str, spec: ModelSpec, key: str) -> str:
        """The model stage of ``spec`` and, when configured, its SFT stage (the paper SFTs
        teacher and source on Dolly first); returns the name of the last one."""
        stages.append(Stage(name, model_stage(cfg, spec, name), inputs=["data"], output=f"models/{name}",
                            config={"model": spec.model_dump(mode="json", exclude={"sft"}),
                                    "device": cfg.scaling.device}))
        if spec.sft is None or not spec.sft.enabled:
            return name
        s = {**base, "objective": "sft", **spec.sft.distill}
        stages.append(Stage(f"{name}_sft", distill_stage(cfg, s, f"{key}.sft.distill", None, name),
                            inputs=[name, "data"], output=f"models/{name}_sft", config={"distill": s}))
        return f"{name}_sft"

    if cfg.bridge is not None:
        tprev = model_then_sft("teacher", cfg.bridge.teacher, "bridge.teacher")
        g = cfg.bridge.generation.model_dump(mode="json")
        stages.append(Stage("bridge_data", bridge_data_stage(cfg, tprev), inputs=[tprev, "data"],
                            output="data/bridge", config={"generation": g, "seed": seed}, teacher="teacher"))
    prev = model_then_sft("source", cfg.source, "source")
    if cfg.bridge is not None:
        s = {**base, **cfg.bridge.distill, "objective": "seqkd"}
        # SeqKD trains on the teacher's answers: the teacher model itself is not run again.
        stages.append(Stage("bridge", distill_stage(cfg, s, "bridge.distill", None, prev,
                                                     data_file="answers.jsonl", data_input="bridge_data"),
                            inputs=[prev, "bridge_data", "data"], output="models/bridge", config={"distill": s}))
        prev = "bridge"
    steps, chain = _anchor_stages(cfg, prev, base)
    stages += steps
    stages.append(Stage("grid", grid_stage(cfg, chain), inputs=[*dict.fromkeys(chain), "data"], output="targets",
                        config={"grid": _grid_identity(cfg)}))
    if cfg.grid.export:
        from cbd_ray.stages.export import export_stage

        stages.append(Stage("export", export_stage(cfg, _produce), inputs=["grid"], output="exports",
                            config={"export": list(cfg.grid.export)}))
    if cfg.evaluation.baselines:  # what users would do instead, scored beside the targets (cbd_ray.stages.baselines)
        from cbd_ray.stages.baselines import baselines_stage

        stages.append(Stage("baselines", baselines_stage(cfg, chain[0]), inputs=[chain[0], "data"], output="baselines",
                            config={"baselines": cfg.evaluation.baselines, "distill": cfg.step_distill(0),
                                    "grid": cfg.grid.model_dump(mode="json", exclude={"export"}), "seed": seed},
                            teacher="source"))
    stages.append(Stage("evaluate", evaluate_stage(cfg, chain), inputs=[*dict.fromkeys(chain), "grid", "data"],
                        output="evaluation", config={"evaluation": cfg.evaluation.model_dump(mode="json"),
                                                     "seed": seed}))
    report_inputs = ["grid", "evaluate", *(["export"] if cfg.grid.export else []),
                     *(["baselines"] if cfg.evaluation.baselines else [])]
    stages.append(Stage("report", report_stage(cfg), inputs=report_inputs, output="stages/report",
                        config={"version": 1}))
    return stages


def _grid_identity(cfg: ChainConfig) -> dict[str, Any]:
    """The grid settings its stage hash covers: the α search's own settings only when it
    runs, so configs without it keep the stage hashes they had before it existed."""
    skip = {"export"} | (set() if cfg.grid.alpha == "search" else {"search_alphas", "search_windows", "search_seq_len"})
    return cfg.grid.model_dump(mode="json", exclude=skip)


def _anchor_stages(cfg: ChainConfig, top: str, base: dict[str, Any]) -> tuple[list[Stage], list[str]]:
    """The chain steps ``chain_1..K`` below ``top`` (the source, its SFT or the bridge): each
    distils anchor k from the model above it, preceded by the anchor's SFT stage
    ``<name>_sft`` when ``anchors[k].sft`` is set (the anchor's start, SFT'd on the
    instructions, is then the step's student). Returns (the stages, the chain's model stages
    from ``top`` down)."""
    stages: list[Stage] = []
    prev, chain, teacher_label = top, [top], "bridge" if top == "bridge" else "source"
    for i, a in enumerate(cfg.anchors):
        s = cfg.step_distill(i)
        init = {"init": a.init, "model": a.model, "shape": a.shape.model_dump() if a.shape else None, "seed": a.seed}
        name, student, start = f"chain_{i + 1}", prev, init
        anchor = a.model_dump(mode="json", exclude={"sft"})  # stage hashes of configs without sft stay
        if a.sft is not None and a.sft.enabled:
            student, start = f"{a.name}_sft", None
            s_sft = {**base, "objective": "sft", **a.sft.distill}
            # a public checkpoint needs only the instructions; a pruned or random start is made
            # from its parent (the model above it), as the chain step would make it
            sft_inputs = ["data"] if a.init == "checkpoint" else [prev, "data"]
            stages.append(Stage(student, distill_stage(cfg, s_sft, f"anchors.{i}.sft.distill", None, prev, init=init),
                                inputs=sft_inputs, output=f"models/{a.name}_sft",
                                config={"distill": s_sft, "anchor": anchor}))
        stages.append(Stage(name, distill_stage(cfg, s, f"anchors.{i}.distill", prev, student, init=start),
                            inputs=[*dict.fromkeys([prev, student]), "data"], output=f"models/{a.name}",
                            config={"distill": s, "anchor": anchor}, teacher=teacher_label))
        prev, teacher_label = name, a.name
        chain.append(name)
    return stages, chain


def stage_names(cfg: ChainConfig) -> list[str]:
    return [s.name for s in build_stages(cfg)]


# ---------------------------------------------------------------------- the job


def identity(cfg: ChainConfig) -> dict[str, Any]:
    """What makes a run directory belong to a config: its name and the chain's structure
    (source, bridge teacher, anchors). Other settings may change between reruns; the stages
    they touch are redone."""
    structure = {
        "source": cfg.source.model_dump(mode="json", exclude={"sft"}),
        "teacher": cfg.bridge.teacher.model_dump(mode="json", exclude={"sft"}) if cfg.bridge else None,
        "anchors": [{"name": a.name, "model": a.model, "shape": a.shape.model_dump() if a.shape else None}
                    for a in cfg.anchors],
    }
    return {"name": cfg.run.name, "structure": config_hash(structure)}


def with_searched_alpha(cfg: ChainConfig, run_dir: Path, log: Log = _say) -> ChainConfig:
    """``grid.alpha: best``: grid targets without their own α take the one the α search wrote
    to ``<run>/tune/best_alpha.json``; the others (and all when no search ran) use "auto".
    The grid stage's hash covers the targets, so a new search result redoes the grid."""
    from cbd_ray.stages.tune import apply_best_alpha, load_best_alpha

    searched = load_best_alpha(run_dir)
    used = [t.label for t in cfg.grid.targets if t.alpha is None and t.label in searched]
    log(f"grid α: searched α for {', '.join(used) or 'no target'} (tune/best_alpha.json); auto for the rest")
    cfg = apply_best_alpha(cfg, run_dir)
    return cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"alpha": "auto"})})


def resolve_run_dir(cfg: ChainConfig, storage: str | None = None) -> tuple[str, Path, bool]:
    """(run URI, the driver's run directory, remote?). With object storage (s3://...) the URI
    is the run directory, the source of truth; the driver keeps a private working copy of
    its small files and the models it needs to check (``$CBD_LOCAL_RUNS`` or
    ~/.cache/cbd_ray/runs, keyed by the URI), refreshed from the URI at every start."""
    import hashlib

    from cbd_ray.storage import is_remote, local_path, uri_join

    root = storage or cfg.run.storage
    if is_remote(root):
        uri = uri_join(root, cfg.run.name)
        local_root = Path(os.environ.get("CBD_LOCAL_RUNS", Path.home() / ".cache" / "cbd_ray" / "runs"))
        key = hashlib.sha256(uri.encode()).hexdigest()[:12]
        return uri, local_root / f"{cfg.run.name}-{key}", True
    run_dir = local_path(root).expanduser().resolve() / cfg.run.name
    return str(run_dir), run_dir, False


def _not_a_run_dir(uri: str, run_dir: Path, remote: bool) -> None:
    """Refuse a run directory that exists, holds something, and was not made by this project
    (no manifest.json): its stages would replace the user's same-named folders."""
    from cbd_ray.lease import LEASE_FILE
    from cbd_ray.manifest import MANIFEST
    from cbd_ray.storage import list_files, redact

    if remote:  # the lease (this driver's, taken first) does not make a directory a run
        files = [f for f in list_files(uri) if f != LEASE_FILE]
        foreign = bool(files) and MANIFEST not in files
    else:
        foreign = (run_dir.is_dir() and any(e.name != LEASE_FILE for e in run_dir.iterdir())
                   and not (run_dir / MANIFEST).is_file())
    if foreign:
        raise RunDirConflict(f"run directory {redact(uri)} exists and is not a cbd-ray run (no {MANIFEST}); "
                             "choose another run.name or --storage")


def _fetch_run(uri: str, run_dir: Path, log: Log) -> None:
    """Refresh the driver's copy of a remote run from the URI: only "not found" means a new
    run; any other storage error stops the job (never start afresh over a run we could not read)."""
    import shutil

    from cbd_ray.lease import LEASE_FILE
    from cbd_ray.storage import redact, sync_down

    if run_dir.exists():
        shutil.rmtree(run_dir)  # the driver's private copy: the URI is the truth
    run_dir.mkdir(parents=True)
    # checkpoints stay in storage for Ray Train, token corpora for the workers that stream them
    n = sync_down(uri, run_dir, exclude=("work", "corpora", LEASE_FILE))
    log(f"storage: {n} file(s) of {redact(uri)} fetched" if n else f"storage: {redact(uri)} is a new run")


def _uploader(uri: str, run_dir: Path, manifest: Manifest,
              check: Callable[[], None] = lambda: None) -> Callable[[str], None]:
    """After each stage: its output directory replaces the one in storage, then the
    top-level files (manifest last, so storage never records outputs it does not hold).
    ``check`` runs first (the lease's: never write over a driver that took the run over)."""
    from cbd_ray.lease import LEASE_FILE
    from cbd_ray.manifest import MANIFEST
    from cbd_ray.storage import delete_dir, upload_dir, upload_file, uri_join

    def upload(stage: str) -> None:
        check()
        rec = manifest.get(stage) or {}
        rel = (rec.get("outputs") or {}).get("path")
        if rec.get("status") == "done" and rel and (run_dir / rel).is_dir():
            delete_dir(uri_join(uri, rel))
            upload_dir(run_dir / rel, uri_join(uri, rel))
        top = [f for f in sorted(run_dir.iterdir()) if f.is_file() and f.name not in (MANIFEST, LEASE_FILE)]
        for f in [*top, run_dir / MANIFEST]:
            upload_file(f, uri_join(uri, f.name))

    return upload


def run_chain(cfg: ChainConfig, storage: str | None = None, from_stage: str | None = None, force: bool = False,
              after_stage: Callable[[str, dict[str, Any]], None] | None = None, log: Log = _say) -> dict[str, Any]:
    """Run (or resume) the chain of ``cfg``; returns the run directory, the manifest and the
    teacher-cost rows. Checks, in order and before any work: the storage root can be
    written, ``from_stage`` names a stage, no other live driver holds the run directory
    (its lease, cbd_ray.lease: else LeaseHeld; held until the run ends), and the run
    directory belongs to this config (else RunDirConflict unless ``force``)."""
    from cbd_ray.lease import hold_run_dir
    from cbd_ray.storage import check_writable

    root = storage or cfg.run.storage
    check_writable(root)
    uri, run_dir, remote = resolve_run_dir(cfg, storage)
    names = stage_names(cfg)
    if from_stage is not None and from_stage not in names:
        raise CBDError(f"--from-stage {from_stage!r} is not a stage of this run; stages: {', '.join(names)}")
    # one driver per run directory: a second one is refused here, before it writes anything
    # or starts Ray (two local clusters break Ray Train's placement-group cleaner)
    with hold_run_dir(uri, cfg.run.lease_timeout_s) as lease:
        return _run_held(cfg, uri, run_dir, remote, lease, from_stage, force, after_stage, log)


def _run_held(cfg: ChainConfig, uri: str, run_dir: Path, remote: bool, lease: Any, from_stage: str | None,
              force: bool, after_stage: Callable[[str, dict[str, Any]], None] | None, log: Log) -> dict[str, Any]:
    """run_chain's work once the run directory's lease is held: between stages, and before
    anything reaches storage, a lost lease (another driver took over) stops the run."""
    import yaml

    from cbd_ray.stages.summary import cost_rows, format_cost_table
    from cbd_ray.storage import atomic_write_text, redact

    stages = build_stages(cfg)
    names = [s.name for s in stages]
    _not_a_run_dir(uri, run_dir, remote)
    if remote:
        _fetch_run(uri, run_dir, log)
    if cfg.grid.alpha == "best":
        cfg = with_searched_alpha(cfg, run_dir, log)
        stages = build_stages(cfg)
    manifest = Manifest.load(run_dir)
    ident, old = identity(cfg), manifest.identity()
    if old is not None and old != ident:
        if not force:
            raise RunDirConflict(
                f"run directory {run_dir} belongs to another config (name {old.get('name')!r}, chain structure "
                f"{str(old.get('structure'))[:12]}; this config: {ident['name']!r}, {ident['structure'][:12]}); "
                f"choose another run.name or storage, or pass --force to redo it")
        log(f"run directory {run_dir} belonged to another config: --force redoes every stage")
        from_stage = from_stage or names[0]
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest.data["order"] = names
    manifest.set_identity(ident)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    log(f"run {cfg.run.name}: {len(stages)} stages ({', '.join(names)}) in {redact(uri)}")
    sync = _uploader(uri, run_dir, manifest, lease.check) if remote else None
    if sync is not None:
        sync("")  # the identity and config reach storage before any stage runs

    def after(stage: str, record: dict[str, Any]) -> None:
        lease.check()  # another driver took the run directory over: stop before the next stage
        if after_stage is not None:
            after_stage(stage, record)

    started = connect_ray()
    t0 = time.perf_counter()
    try:
        manifest = run_stages(stages, run_dir, manifest, from_stage=from_stage, force=force,
                              after_stage=after, on_saved=sync, log=log, run_uri=uri if remote else None)
    finally:
        if started:
            import ray

            ray.shutdown()
    rows = cost_rows(manifest, n_targets=len(cfg.grid.targets))
    log(format_cost_table(rows))
    report = run_dir / "report.md"
    log(f"run {cfg.run.name}: finished in {time.perf_counter() - t0:.1f}s; report: {report}")
    return {"run_dir": run_dir, "uri": uri, "manifest": manifest, "cost": rows, "report": report}

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

This module builds the stage list (:func:`build_stages`) and holds the model, distillation
and grid stages. The others have modules of their own: ``data`` (cbd_ray.stages.data),
``evaluate`` (cbd_ray.stages.heldout), ``report`` (cbd_ray.stages.summary), ``export`` and
``baselines``. What stages share lives below them: cbd_ray.stages.worker (where a stage's
work runs), cbd_ray.stages.rundir (the run directory) and cbd_ray.stages.grid_settings
(resize options, the searched α). docs/architecture.md follows one run through them.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from cbd_ray.config import build
from cbd_ray.errors import CBDError, ConfigError
from cbd_ray.manifest import Manifest
from cbd_ray.pipeline import RunDirConflict, Stage, StageContext, run_stages
from cbd_ray.schema import ChainConfig, ModelSpec, target_pair
from cbd_ray.console import LOG_FILE, log_file
from cbd_ray.session import connect_ray
from cbd_ray.stages.data import data_stage, read_jsonl, run_corpus
from cbd_ray.stages.grid_settings import resize_options, with_searched_alpha
from cbd_ray.stages.heldout import evaluate_stage
from cbd_ray.stages.models import model_dir_of
from cbd_ray.stages.rundir import fetch_run, identity, refuse_foreign, resolve_run_dir, uploader
from cbd_ray.stages.summary import report_stage
from cbd_ray.stages.worker import accel, model_ref, produce

Log = Callable[[str], None]
logger = logging.getLogger(__name__)


def _say(s: str) -> None:
    logger.info("%s", s)


# ---------------------------------------------------------------------- models


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
        init = ctx.work / "init"
        if not (init / "config.json").is_file():  # the tokenizer may learn from the records
            tok_text = read_text_source(t.tokenizer.text, read_jsonl(ctx.inputs["data"] / "train.jsonl"))
            init_tiny(init, t.family, t.shape.model_dump(), tok_text, t.tokenizer.vocab_size, t.max_positions, t.seed)
        metrics = _pretrain(cfg, ctx, init, t.pretrain, t.seed,
                            f"{role}: tiny {t.family} {t.shape.layers}x{t.shape.hidden}x{t.shape.heads}")
        return {**metrics, "model": None}

    return fn


def _pretrain(cfg: ChainConfig, ctx: StageContext, init: Path, p: Any, seed: int, what: str) -> dict[str, Any]:
    """The model in ``init`` pretrained with the settings ``p`` (a PretrainSpec) on the data
    stage's training text, as one task on a worker (``pretrain_lm``, resumable from ctx.work)."""
    text = (ctx.inputs["data"] / "text_train.txt").read_text()
    ctx.log(f"{what}, pretraining {p.steps} steps on {len(text):,} chars")
    return produce(cfg, ctx, _pretrain_task, ctx.publish(init, "init"), text, None if ctx.remote else str(ctx.work),
                   p.steps, p.batch_size, p.seq_len, p.lr, p.checkpoint_every, seed)


def anchor_pretrain_stage(cfg: ChainConfig, anchor: Any, source: str) -> Callable[[StageContext], dict[str, Any]]:
    """``init: pretrain``: the anchor's random initialisation at its shape, with the vocabulary
    and positions of ``source`` (the chain's source model stage), pre-trained from scratch on
    the data section's text in a stage of its own, so the family is trained apart (as the
    paper's public checkpoints are) and shares one tokenizer. Settings:
    ``cfg.anchor_pretrain(anchor)``."""

    def fn(ctx: StageContext) -> dict[str, Any]:
        from cbd_ray.stages.models import random_like

        init = ctx.work / "init"
        if not (init / "config.json").is_file():
            random_like(model_dir_of(ctx.inputs[source]), init, cfg.family or "gpt2",
                        anchor.shape.model_dump(), anchor.seed)
        sh = anchor.shape
        metrics = _pretrain(cfg, ctx, init, cfg.anchor_pretrain(anchor), anchor.seed,
                            f"{ctx.name}: {anchor.name} {sh.layers}x{sh.hidden}x{sh.heads} from random")
        return {**metrics, "model": None, "init": "pretrain"}

    return fn


# ---------------------------------------------------------------------- distillation


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
        lm_ref = run_corpus(ctx, dcfg, student_ref)
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
        recs = read_jsonl(ctx.inputs["data"] / "train.jsonl")
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
        resize = resize_options(cfg, ctx.inputs["data"])
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
        if failed:
            (ctx.out / "targets.json").write_text(json.dumps(records, indent=2, default=str) + "\n")
            raise CBDError("grid targets failed: " + "; ".join(f"{r['name']}: {r.get('error')}" for r in failed))
        spent = {"student_tokens": 0, "teacher_tokens": 0}
        if cfg.grid.recover is not None:
            from cbd_ray.stages.recover import recover_targets

            teachers = {names[i]: model_ref(ctx, chain_stages[i]) for i in range(1, len(chain_stages))}
            spent = recover_targets(ctx, cfg, records, teachers)
        (ctx.out / "targets.json").write_text(json.dumps(records, indent=2, default=str) + "\n")
        return {"targets": len(records), **spent,
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
    kind, opts = accel(cfg)
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

        stages.append(Stage("export", export_stage(cfg, produce), inputs=["grid"], output="exports",
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
    skip |= set() if cfg.grid.recover is not None else {"recover"}
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
        anchor = a.model_dump(mode="json", exclude={"sft", "pretrain"})  # stage hashes of older configs stay
        sft_student, sft_init = prev, init
        if a.init == "pretrain":  # trained apart: its own stage, from random, on the chain's text
            student = sft_student = f"{a.name}_pretrain"
            start = sft_init = None
            p = cfg.anchor_pretrain(a).model_dump(mode="json")
            stages.append(Stage(student, anchor_pretrain_stage(cfg, a, "source"), inputs=["source", "data"],
                                output=f"models/{a.name}_pretrain",
                                config={"anchor": anchor, "pretrain": p, "device": cfg.scaling.device}))
        if a.sft is not None and a.sft.enabled:
            student, start = f"{a.name}_sft", None
            s_sft = {**base, "objective": "sft", **a.sft.distill}
            # a public checkpoint needs only the instructions; a pruned or random start is made
            # from its parent (the model above it), as the chain step would make it
            sft_inputs = ["data"] if a.init == "checkpoint" else [sft_student, "data"]
            stages.append(Stage(student, distill_stage(cfg, s_sft, f"anchors.{i}.sft.distill", None, sft_student,
                                                       init=sft_init),
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
    refuse_foreign(uri, run_dir, remote)
    if remote:
        fetch_run(uri, run_dir, log)
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
    sync = uploader(uri, run_dir, manifest, lease.check) if remote else None
    if sync is not None:
        sync("")  # the identity and config reach storage before any stage runs

    def after(stage: str, record: dict[str, Any]) -> None:
        lease.check()  # another driver took the run directory over: stop before the next stage
        if after_stage is not None:
            after_stage(stage, record)

    with log_file(run_dir / LOG_FILE):  # made now that the manifest marks the directory as a run
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

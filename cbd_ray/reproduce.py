"""The paper's comparisons: CBD against its baselines at one shape, the same budget after.

For every target shape of a chain config, every method of :mod:`cbd_ray.baselines`
initialises a model; each is fine-tuned on the same downstream data with the same budget
(same steps, batches in the same order: cbd_ray.finetune), its held-out loss curve is
recorded, and it is evaluated the same way (held-out loss, and tasks of cbd_ray.evaluate
when configured). ``<run>/report.md`` then shows a row per method and target, the plots
(scores by size per method, loss curves of CBD against Rand, the α sweep and the chain
density), and the convergence speed-up: the steps CBD needs to reach Rand's final loss.

Run directory (``<storage>/<run.name>``)::

    chain/                 the chain's own run directory (jobs/build_chain.py layout);
      tune/                α and chain-density searches (cbd_ray.stages.tune)
    reproduce/data/        the downstream train / held-out text every method sees
    reproduce/<target>/<method>/init/         the initialised model
    reproduce/<target>/<method>/result.json   its fine-tuning curve and scores
    plots/*.png  results.json  report.md

A rerun reuses the chain and the searches and skips every (target, method) whose
result.json was made with the same settings.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, PositiveInt

from cbd_ray.baselines import (METHODS, init_auto_learngene, init_cbd, init_direct_kd, init_rand, init_single,
                               init_van_learngene)
from cbd_ray.config import Strict, apply_overrides, build, load_yaml
from cbd_ray.errors import CBDError, ConfigError
from cbd_ray.schema import RunSpec, config_hash, parse_config
from cbd_ray.stages.tune import TuneSettings

Log = Callable[[str], None]
Method = Literal["cbd", "rand", "single", "direct_kd", "auto_learngene", "van_learngene"]
LABELS = {"cbd": "CBD", "rand": "Rand", "single": "Single", "direct_kd": "Direct KD",
          "auto_learngene": "Auto-Learngene", "van_learngene": "Van-Learngene"}


class FinetuneSpec(Strict):
    """The downstream budget every method gets."""

    data: str = "text"  # text: the chain's text split; instructions: its records in the prompt template; or a file
    steps: PositiveInt = 60
    batch_size: PositiveInt = 8
    seq_len: PositiveInt = 64
    lr: float = Field(default=1e-3, gt=0)
    eval_every: PositiveInt = 10
    eval_windows: PositiveInt = 16
    heldout_fraction: float = Field(default=0.1, gt=0, lt=1)  # for a file given as data
    keep_models: bool = False  # keep the fine-tuned models (tasks are scored before they go)


class LearngeneSpec(Strict):
    genes: PositiveInt = 3
    inherit_embeddings: bool = True


class ReproEvalSpec(Strict):
    tasks: list[str] = []
    data_dir: str | None = None
    limit: PositiveInt | None = 100
    batch_size: PositiveInt = 16


class ReproduceConfig(Strict):
    """A comparison run: a chain config and how to compare the initialisations."""

    run: RunSpec
    chain: str | dict[str, Any]                   # a chain config file (relative to this file) or inline
    chain_overrides: list[str] = []
    methods: list[Method] = Field(default=list(METHODS), min_length=1)
    targets: list[str] | None = None              # None: every grid target of the chain
    alpha: Literal["best", "auto"] | float = "best"  # best: from the α search (run when missing)
    density: bool = True                          # also run the chain-density search
    tune: TuneSettings = TuneSettings()
    finetune: FinetuneSpec = FinetuneSpec()
    learngene: LearngeneSpec = LearngeneSpec()
    direct_kd: dict[str, Any] = {}                # distill overrides on top of the first chain step's
    evaluation: ReproEvalSpec = ReproEvalSpec()
    cpus_per_task: float = Field(default=1, gt=0)
    gpus_per_task: float = Field(default=0, ge=0)

    def model_post_init(self, __context: Any) -> None:
        if isinstance(self.alpha, float) and not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1], 'auto' or 'best'")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods {self.methods} repeat a method")


def load_reproduce_config(path: str | os.PathLike, overrides: list[str] | None = None) -> tuple[ReproduceConfig, Any]:
    """(the comparison config, its chain config), both validated before any work."""
    path = Path(path)
    cfg = build(ReproduceConfig, apply_overrides(load_yaml(path), overrides), source=str(path))
    if isinstance(cfg.chain, str):
        p = Path(cfg.chain)
        for cand in (p, path.parent / p, Path.cwd() / p):
            if cand.is_file():
                p = cand
                break
        else:
            raise ConfigError(f"chain: config file {cfg.chain!r} not found (looked beside {path} and in {Path.cwd()})")
        data = load_yaml(p)
        source = str(p)
    else:
        data, source = json.loads(json.dumps(cfg.chain)), f"{path}: chain"
    data = apply_overrides(data, list(cfg.chain_overrides))
    # The chain lives inside the comparison's run directory (set in run_reproduce).
    data.setdefault("run", {})["name"] = "chain"
    chain = parse_config(data, source=source)
    if cfg.targets:
        known = [t.label for t in chain.grid.targets]
        bad = [t for t in cfg.targets if t not in known]
        if bad:
            raise ConfigError(f"targets: {', '.join(bad)} not in the chain's grid; it has: {', '.join(known)}")
    if "direct_kd" in cfg.methods:
        try:
            from cbd_ray.train import DistillConfig

            build(DistillConfig, {**chain.step_distill(0), **cfg.direct_kd}, source=f"{path}: direct_kd")
        except ImportError:
            pass  # reported as a skipped method at run time
    return cfg, chain


# --------------------------------------------------------------------------- data


def _downstream(cfg: ReproduceConfig, chain_run: Path, out: Path) -> tuple[Path, Path]:
    """Write the downstream train / held-out text every method sees; returns their paths."""
    from cbd_ray.stages.bridge import render_prompt
    from cbd_ray.storage import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    d = cfg.finetune.data
    data = chain_run / "data"
    if d == "text":
        train, held = (data / "text_train.txt").read_text(), (data / "text_heldout.txt").read_text()
    elif d == "instructions":
        def render(p: Path) -> str:
            rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
            return "\n\n".join(render_prompt(r["instruction"], r.get("context", "")) + r["response"] for r in rows)

        train, held = render(data / "train.jsonl"), render(data / "eval.jsonl")
    else:
        p = Path(d)
        if not p.is_file():
            raise FileNotFoundError(f"finetune.data {d!r} is neither 'text', 'instructions' nor a file")
        text = p.read_text(encoding="utf-8")
        cut = int(len(text) * (1 - cfg.finetune.heldout_fraction))
        train, held = text[:cut], text[cut:]
    atomic_write_text(out / "train.txt", train)
    atomic_write_text(out / "heldout.txt", held)
    return out / "train.txt", out / "heldout.txt"


# --------------------------------------------------------------------------- one (target, method)


def finetune_and_score(init_dir: str, train_path: str, heldout_path: str, ft: dict[str, Any], seed: int,
                       tasks: list[str], data_dir: str | None, limit: int | None, eval_batch: int,
                       work_dir: str) -> dict[str, Any]:
    """Fine-tune the model in ``init_dir`` with the common budget and score it (one Ray task)."""
    from cbd_ray.finetune import finetune_lm

    keep = ft.get("keep_models", False)
    out = Path(work_dir) / "finetuned"
    if out.exists():
        shutil.rmtree(out)
    res = finetune_lm(init_dir, Path(train_path).read_text(), Path(heldout_path).read_text(), steps=ft["steps"],
                      batch_size=ft["batch_size"], seq_len=ft["seq_len"], lr=ft["lr"], eval_every=ft["eval_every"],
                      eval_windows_n=ft["eval_windows"], seed=seed, out_dir=out if (tasks or keep) else None,
                      log=lambda s: print(f"{Path(work_dir).parent.name}/{Path(work_dir).name}: {s}", flush=True))
    if tasks:
        from cbd_ray.evaluate import evaluate_model

        res["tasks"] = evaluate_model(out, tasks, data_dir=data_dir, limit=limit, batch_size=eval_batch,
                                      device="auto", progress=False)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return res


def _params(model_dir: Path) -> int:
    from cbd_ray.resize import Checkpoint

    return int(Checkpoint(model_dir).params)


def _init(method: str, t: dict[str, Any], source: str, out: Path, cfg: ReproduceConfig, chain_cfg: Any,
          chain_run: Path, alpha: float | str, log: Log) -> dict[str, Any]:
    """Initialise one method's model for target ``t``; returns provenance for the results row."""
    seed = cfg.run.seed
    shape = t["shape"]
    lg = cfg.learngene
    if method == "cbd":
        init_cbd(t["small"], t["large"], shape, out, alpha=alpha, resize=t["resize"], overwrite=True)
        return {"alpha": json.loads((out / "baseline.json").read_text())["alpha"], "from": t["pair"]}
    if method == "rand":
        init_rand(source, shape, out, seed=seed, overwrite=True)
        return {"from": "random init"}
    if method == "single":
        init_single(t["small"], shape, out, resize=t["resize"], overwrite=True)
        return {"from": t["pair"].split(">")[1] + " expanded"}
    if method in ("auto_learngene", "van_learngene"):
        fn = init_auto_learngene if method == "auto_learngene" else init_van_learngene
        fn(source, shape, out, genes=lg.genes, seed=seed, inherit_embeddings=lg.inherit_embeddings,
           resize=t["resize"], overwrite=True)
        info = json.loads((out / "baseline.json").read_text())
        return {"from": "source layers " + ",".join(str(v) for v in info["layers"].values())}
    if method == "direct_kd":
        settings = {**chain_cfg.step_distill(0), **cfg.direct_kd}
        init_direct_kd(source, shape, out, chain_run / "data" / "train.jsonl", settings,
                       eval_data=chain_run / "data" / "eval.jsonl", seed=seed, work_dir=out.parent / "kd_work",
                       overwrite=True, log=log)
        info = json.loads((out / "baseline.json").read_text())
        m = info.get("metrics") or {}
        return {"from": "source (direct)", "teacher_tokens": int(m.get("teacher_tokens") or 0),
                "distill_steps": settings.get("steps")}
    raise CBDError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


# --------------------------------------------------------------------------- the run


def resolve_run(cfg: ReproduceConfig, storage: str | None) -> tuple[Path, str | None]:
    from cbd_ray.storage import is_remote, local_path

    root = storage or cfg.run.storage
    if is_remote(root):
        local = Path(os.environ.get("CBD_LOCAL_RUNS", Path.home() / ".cache" / "cbd_ray" / "runs")) / cfg.run.name
        return local, root.rstrip("/") + "/" + cfg.run.name
    return local_path(root).expanduser().resolve() / cfg.run.name, None


def run_reproduce(cfg: ReproduceConfig, chain_cfg: Any, storage: str | None = None, log: Log = print,
                  command: str | None = None) -> dict[str, Any]:
    """Build or reuse the chain, search α, initialise every method for every target,
    fine-tune and score them, and write ``<run>/report.md``. Returns {"run_dir", "rows",
    "report"}."""
    import ray

    from cbd_ray.session import connect_ray as ensure_ray
    from cbd_ray.stages.chain import run_chain
    from cbd_ray.stages.tune import (chain_models, chain_targets, resize_fields, run_alpha_search,
                                     run_density_search)
    from cbd_ray.storage import atomic_write_json, check_writable, sync_down, sync_up

    t_start = time.perf_counter()
    run_dir, uri = resolve_run(cfg, storage)
    check_writable(str(run_dir.parent) if uri is None else uri)
    run_dir.mkdir(parents=True, exist_ok=True)
    if uri:
        try:
            sync_down(uri, run_dir)
        except Exception as exc:  # noqa: BLE001 - a new run has nothing to fetch
            log(f"storage: nothing fetched from {uri} ({type(exc).__name__})")
    chain_cfg = chain_cfg.model_copy(update={"run": chain_cfg.run.model_copy(update={"name": "chain",
                                                                                    "storage": str(run_dir)})})
    started = ensure_ray()
    try:
        log(f"reproduce {cfg.run.name}: building or reusing the chain in {run_dir / 'chain'}")
        run_chain(chain_cfg, log=log)
        chain_run = run_dir / "chain"
        chain = chain_models(chain_cfg, chain_run)
        targets = chain_targets(chain_cfg, chain, cfg.targets)
        resize = resize_fields(chain_cfg, chain_run)
        from cbd_ray.interpolate import ResizeOptions

        for t in targets:
            t["resize"] = ResizeOptions(**resize)
        texts = (chain_run / "data" / "text_train.txt", chain_run / "data" / "text_heldout.txt")
        best: dict[str, float] = {}
        if cfg.alpha == "best":
            best = run_alpha_search(chain_run, targets, *texts, settings=cfg.tune, resize=resize, log=log)
        if cfg.density and cfg.tune.densities and len(chain) > 2:
            run_density_search(chain_run, chain, targets, *texts, settings=cfg.tune, resize=resize, log=log)
        train_p, held_p = _downstream(cfg, chain_run, run_dir / "reproduce" / "data")
        source = chain[0][1]
        ft = cfg.finetune.model_dump()
        ev = cfg.evaluation
        settings_key = {"finetune": ft, "evaluation": ev.model_dump(), "learngene": cfg.learngene.model_dump(),
                        "direct_kd": cfg.direct_kd, "seed": cfg.run.seed,
                        "data": config_hash(train_p.read_text() + "\0" + held_p.read_text())}
        rows: list[dict[str, Any]] = []
        pending: list[tuple[dict[str, Any], Path, Any]] = []
        task = ray.remote(finetune_and_score).options(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task or None,
                                                      max_retries=0)
        for t in targets:
            # best: the searched α (the grid's own α, else auto, for a target the search left out)
            alpha: float | str = best.get(t["name"], t.get("alpha") or "auto") if cfg.alpha == "best" else cfg.alpha
            for method in cfg.methods:
                d = run_dir / "reproduce" / t["name"] / method
                key = config_hash({**settings_key, "method": method, "alpha": alpha, "target": t["shape"],
                                   "anchors": [t["small"], t["large"]], "chain": _chain_digest(chain_run)})
                row = {"target": t["name"], "method": method, "label": LABELS[method]}
                old = d / "result.json"
                if old.is_file():
                    prev = json.loads(old.read_text())
                    if prev.get("key") == key:
                        log(f"reproduce: {t['name']}/{method}: reusing its result")
                        rows.append(prev["row"])
                        continue
                try:
                    info = _init(method, t, source, d / "init", cfg, chain_cfg, chain_run, alpha, log)
                except CBDError as exc:
                    if method != "direct_kd" or "cbd_ray.train" not in str(exc):
                        raise
                    log(f"reproduce: {t['name']}/direct_kd skipped: {exc}")
                    rows.append({**row, "status": f"skipped: {exc}"})
                    continue
                row.update(info, params=_params(d / "init"))
                ref = task.remote(str(d / "init"), str(train_p), str(held_p), ft, cfg.run.seed, list(ev.tasks),
                                  ev.data_dir, ev.limit, ev.batch_size, str(d))
                pending.append((row, d, (ref, key)))
        log(f"reproduce: fine-tuning {len(pending)} model(s), {cfg.finetune.steps} steps each")
        for row, d, (ref, key) in pending:
            res = ray.get(ref)
            row.update(status="ok", initial_loss=res["initial_eval"], final_loss=res["final_eval"],
                       eval_curve=res["eval_curve"], train_curve=res["train_curve"], tokens=res["tokens"],
                       seconds=res["seconds"])
            for tr in res.get("tasks") or []:
                for k, v in tr["metrics"].items():
                    if not k.endswith("_stderr"):
                        row[f"{tr['task']}.{k}"] = v
            atomic_write_json(d / "result.json", {"key": key, "row": row})
            log(f"reproduce: {row['target']:>12} {row['label']:<15} loss {row['initial_loss']:.4f} -> "
                f"{row['final_loss']:.4f}")
            rows.append(row)
        order = {m: i for i, m in enumerate(cfg.methods)}
        tnames = [t["name"] for t in targets]
        rows.sort(key=lambda r: (tnames.index(r["target"]), order[r["method"]]))
        add_convergence(rows)
        atomic_write_json(run_dir / "results.json", rows)
        report = write_reproduce_report(run_dir, cfg, chain, targets, rows, best, command=command,
                                        seconds=time.perf_counter() - t_start)
        if uri:
            sync_up(run_dir, uri)
        log(f"reproduce {cfg.run.name}: report {report}")
        return {"run_dir": run_dir, "rows": rows, "report": report}
    finally:
        if started:
            ray.shutdown()


def _chain_digest(chain_run: Path) -> str:
    from cbd_ray.manifest import Manifest

    stages = Manifest.load(chain_run).stages
    return config_hash({k: (v.get("outputs") or {}).get("digest") for k, v in sorted(stages.items())})


def add_convergence(rows: list[dict[str, Any]]) -> None:
    """Per target: ``rand_final`` (Rand's held-out loss after the budget) and, for every
    method, ``steps_to_rand`` (steps until its held-out loss reaches Rand's final loss,
    interpolated between evaluations; None when it never does) and ``speedup`` (Rand's own
    steps to that loss divided by the method's)."""
    from cbd_ray.finetune import steps_to_reach

    for target in dict.fromkeys(r["target"] for r in rows):
        rand = next((r for r in rows if r["target"] == target and r["method"] == "rand" and r.get("status") == "ok"), None)
        if rand is None:
            continue
        level = rand["final_loss"]
        rand_steps = steps_to_reach(rand["eval_curve"], level)
        for r in rows:
            if r["target"] != target or r.get("status") != "ok":
                continue
            s = steps_to_reach(r["eval_curve"], level)
            r["rand_final"] = level
            r["delta_vs_rand"] = r["final_loss"] - level
            r["steps_to_rand"] = s
            r["speedup"] = (rand_steps / s) if s and rand_steps else None  # None for 0 steps: unbounded


# --------------------------------------------------------------------------- the report


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU"


def write_reproduce_report(run_dir: Path, cfg: ReproduceConfig, chain: list[tuple[str, str]],
                           targets: list[dict[str, Any]], rows: list[dict[str, Any]], best: dict[str, float],
                           command: str | None = None, seconds: float | None = None) -> Path:
    """``<run>/report.md`` and its plots from the results rows."""
    from cbd_ray.report import Section, markdown_table, plot_curves, plot_scores_by_size, write_report

    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if r.get("status") == "ok"]
    ft = cfg.finetune
    chain_rows = [{"model": n, "parameters": _params(Path(d))} for n, d in chain]
    setup = [
        f"- machine: {_machine()}",
        f"- command: `{command}`" if command else "",
        f"- chain: {' > '.join(f'{n} ({p:,})' for n, p in ((c['model'], c['parameters']) for c in chain_rows))}",
        f"- downstream budget, the same for every method: {ft.steps} steps x {ft.batch_size} x {ft.seq_len} tokens "
        f"({ft.steps * ft.batch_size * ft.seq_len:,} tokens) on `{ft.data}`, lr {ft.lr}, held-out loss every "
        f"{ft.eval_every} steps on {ft.eval_windows} fixed windows; batches in the same order for every method",
        f"- CBD α: {cfg.alpha}" + (f" (searched: {', '.join(f'{k}={v:g}' for k, v in best.items())})" if best else ""),
        f"- Learngene: {cfg.learngene.genes} source layers inherited (width-resized to the target)",
        _teacher_line(run_dir, rows),
        f"- wall time: {seconds:.0f} s" if seconds else "",
    ]
    sections: list[Section] = [Section("Setup", "\n".join(s for s in setup if s))]
    task_cols = sorted({k for r in ok for k in r if "." in k and not k.startswith("_")})
    cols = [("target", "target"), ("label", "method"), ("params", "parameters"), ("from", "initialised from"),
            ("initial_loss", "loss at init"), ("final_loss", "loss after fine-tuning"),
            ("delta_vs_rand", "Δ vs Rand"), ("steps_to_rand", "steps to Rand's final loss"),
            ("speedup", "speed-up vs Rand")] + [(c, c) for c in task_cols] + [("status", "status")]
    sections.append(Section("Results (held-out loss in nats per token; lower is better)",
                            markdown_table(rows, cols, digits=3)))
    sections.append(Section("Where CBD wins and where it loses", _verdicts(ok)))
    images = []
    if ok:
        images.append(plot_scores_by_size([{**r, "method": r["label"]} for r in ok], "final_loss",
                                          plots / "final_loss_by_size.png",
                                          title="held-out loss after fine-tuning, by size"))
        images.append(plot_scores_by_size([{**r, "method": r["label"]} for r in ok], "initial_loss",
                                          plots / "initial_loss_by_size.png", title="held-out loss at initialisation"))
        for c in task_cols:
            images.append(plot_scores_by_size([{**r, "method": r["label"]} for r in ok], c,
                                              plots / f"{c.replace(':', '_').replace('/', '_')}_by_size.png"))
        curves = {f"{r['target']} {r['label']}": [tuple(p) for p in r["eval_curve"]] for r in ok
                  if r["method"] in ("cbd", "rand")}
        if curves:
            images.append(plot_curves(curves, plots / "loss_curves_cbd_vs_rand.png", xlabel="fine-tuning step",
                                      ylabel="held-out loss", title="CBD vs Rand"))
    sections.append(Section("Plots", "", images))
    tune = run_dir / "chain" / "tune"
    if (tune / "alpha_results.md").is_file():
        sections.append(Section("α sweep (held-out loss of the interpolated model per α)",
                                (tune / "alpha_results.md").read_text(),
                                [tune / "alpha_sweep.png"] if (tune / "alpha_sweep.png").is_file() else []))
    if (tune / "density.md").is_file():
        sections.append(Section("Chain density (anchors interpolated between, α auto)", (tune / "density.md").read_text(),
                                [tune / "density.png"] if (tune / "density.png").is_file() else []))
    return write_report(run_dir, sections, title=f"CBD against its baselines: {cfg.run.name}")


def _teacher_line(run_dir: Path, rows: list[dict[str, Any]]) -> str:
    """Teacher tokens: the whole chain's (shared by every CBD target) against Direct KD's."""
    from cbd_ray.manifest import Manifest

    chain = sum(int(v.get("teacher_tokens") or 0) for v in Manifest.load(run_dir / "chain").stages.values())
    kd = [int(r.get("teacher_tokens") or 0) for r in rows if r["method"] == "direct_kd" and r.get("status") == "ok"]
    line = f"- teacher tokens: the chain spent {chain:,} in all (shared by every CBD target)"
    if kd:
        line += f"; Direct KD spent {sum(kd):,} for {len(kd)} target(s) ({sum(kd) // len(kd):,} each)"
    return line


def _verdicts(rows: list[dict[str, Any]]) -> str:
    """Plain sentences: for every baseline, on how many targets CBD's final loss is lower,
    and the targets where it is not (with the numbers)."""
    cbd = {r["target"]: r for r in rows if r["method"] == "cbd"}
    if not cbd:
        return "CBD was not run."
    lines = []
    for m in dict.fromkeys(r["method"] for r in rows):
        if m == "cbd":
            continue
        pairs = [(cbd[r["target"]], r) for r in rows if r["method"] == m and r["target"] in cbd]
        if not pairs:
            continue
        wins = [(c, b) for c, b in pairs if c["final_loss"] < b["final_loss"]]
        line = f"- vs {LABELS[m]}: CBD has the lower loss after fine-tuning on {len(wins)}/{len(pairs)} targets"
        losses = [f"{c['target']} (CBD {c['final_loss']:.4f} vs {b['final_loss']:.4f})" for c, b in pairs
                  if (c, b) not in wins]
        if losses:
            line += "; CBD loses on " + ", ".join(losses)
        init_wins = sum(c["initial_loss"] < b["initial_loss"] for c, b in pairs)
        line += f". At initialisation CBD is lower on {init_wins}/{len(pairs)}."
        lines.append(line)
    speed = []
    for r in cbd.values():
        if "rand_final" not in r:
            continue
        s = r.get("steps_to_rand")
        speed.append(f"{r['target']}: not reached within the budget" if s is None else
                     f"{r['target']}: 0 steps (already below Rand's final loss at initialisation)" if s == 0 else
                     f"{r['target']}: {s:.1f} steps (×{r['speedup']:.2f} fewer than Rand)")
    if speed:
        lines.append("- steps CBD needs to reach Rand's final loss: " + "; ".join(speed))
    return "\n".join(lines)

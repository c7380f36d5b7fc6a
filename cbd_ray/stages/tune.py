"""Ray Tune searches over a built chain: α per target shape, and chain density.

**α search.** For every target, one Tune experiment whose trials each interpolate the target
between its bracketing anchor pair with one α (``AnchorPair.make`` into a scratch directory),
optionally run a short recovery training (cbd_ray.finetune: plain torch inside the trial; a
trial at GPU scale may instead build a TorchTrainer in a driver function), and report the
held-out loss with ``ray.tune.report`` (once, or every ``eval_every`` recovery steps so ASHA
can stop poor α early). Grid search by default (α ∈ {0, .25, .5, .75, 1}); ``random`` samples
``samples`` α uniformly. The best α per target (argmin of the last reported held-out loss
among the trials that ran to the end) goes to ``<run>/tune/best_alpha.json`` (atomically),
with the full table (``alpha_results.json``/``.md``) and the sweep curve (``alpha_sweep.png``).

**Chain density.** Which of the built chain models to interpolate between: for density d,
d models spread evenly over the chain (always the largest and the smallest), and each target
is made from the adjacent pair of that subset that brackets it (α auto). One trial per
(density, target); ``density.json``/``.md``/``.png`` report the held-out loss per target size.

Tune's storage is ``<run>/tune`` (or ``URI/tune`` for a remote run); an experiment's name
carries a hash of its settings, and an unfinished experiment of the same name is resumed
with ``Tuner.restore`` (a killed search redoes only the unfinished trials).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import Field, PositiveInt, field_validator

from cbd_ray.alpha_search import METRIC, best_of
from cbd_ray.config import Strict, config_hash
from cbd_ray.errors import CBDError, ConfigError
from cbd_ray.stages.grid_settings import BEST_ALPHA, load_best_alpha, resize_options
from cbd_ray.stages.rundir import resolve_run_dir

Log = Callable[[str], None]


class TuneSettings(Strict):
    """What the searches try and how each trial is scored."""

    alphas: list[float] = Field(default=[0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    search: Literal["grid", "random"] = "grid"
    samples: PositiveInt = 8                    # trials per target with search=random
    recovery_steps: int = Field(default=0, ge=0)  # 0: score the interpolated model as is
    batch_size: PositiveInt = 8
    seq_len: PositiveInt = 64
    lr: float = Field(default=1e-3, gt=0)
    eval_every: PositiveInt = 5
    eval_windows: PositiveInt = 16
    scheduler: Literal["asha", "fifo"] = "asha"  # ASHA only matters with recovery steps
    densities: list[PositiveInt] = [2, 3, 4]
    targets: list[str] | None = None            # None: every target of the grid
    cpus_per_trial: float = Field(default=1, gt=0)
    gpus_per_trial: float = Field(default=0, ge=0)
    keep_models: bool = False
    seed: int = 0

    @field_validator("alphas")
    @classmethod
    def _alphas_in_range(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"{bad} outside [0, 1]")
        return v

    @field_validator("densities")
    @classmethod
    def _densities_ok(cls, v: list[int]) -> list[int]:
        if any(d < 2 for d in v):
            raise ValueError(f"{v}: a chain needs at least 2 models")
        return v


# --------------------------------------------------------------------------- the trial


def interpolation_trial(config: dict[str, Any]) -> None:
    """A Tune trainable: make one target with one α and report its held-out loss.

    config: ``small``, ``large``, ``shape`` (dict), ``alpha`` (float or "auto"), ``out``
    (scratch model directory), ``resize`` (ResizeOptions fields), ``train_text``,
    ``heldout_text`` (paths) and the recovery settings of :class:`TuneSettings`."""
    import ray.tune

    from cbd_ray.finetune import finetune_lm
    from cbd_ray.interpolate import AnchorPair, ResizeOptions, Shape

    case = config.get("case") or {}
    c = {**config, **case}
    from cbd_ray.storage import materialize

    # anchors and texts are paths or storage references, fetched into this node's cache
    pair = AnchorPair(str(materialize(c["small"])), str(materialize(c["large"])), resize=ResizeOptions(**c["resize"]))
    out = Path(c["out"] or tempfile.mkdtemp(prefix="cbd_trial_")) / (f"alpha-{c['alpha']:.4f}" if isinstance(c["alpha"], float) else "alpha-auto")
    rec = pair.make(Shape(**c["shape"]), out, alpha=c["alpha"], overwrite=True)
    extra = {"alpha": rec["alpha"], "params": rec["params"]}

    def report(step: int, loss: float) -> None:
        ray.tune.report({METRIC: loss, "step": step, **extra})

    try:
        finetune_lm(out, materialize(c["train_text"]).read_text(), materialize(c["heldout_text"]).read_text(),
                    steps=c["recovery_steps"], batch_size=c["batch_size"], seq_len=c["seq_len"], lr=c["lr"],
                    eval_every=c["eval_every"], eval_windows_n=c["eval_windows"], seed=c["seed"], on_eval=report)
    finally:
        if not c["keep_models"]:
            shutil.rmtree(out, ignore_errors=True)


# --------------------------------------------------------------------------- running Tune


def _exp_name(prefix: str, payload: Any) -> str:
    return f"{prefix}-{config_hash(payload)[:10]}"


def _storage(run_dir: Path, storage_uri: str | None) -> str:
    from cbd_ray.storage import uri_join

    return uri_join(storage_uri, "tune") if storage_uri else str((run_dir / "tune").resolve())


def _path_or_ref(x: Any) -> Any:
    from cbd_ray.storage import worker_ref

    return worker_ref(x)


def _fit(param_space: dict[str, Any], settings: TuneSettings, storage: str, name: str, n_reports: int,
         log: Log) -> Any:
    """Run (or resume) one experiment; returns its ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    resources = {"cpu": settings.cpus_per_trial, **({"gpu": settings.gpus_per_trial} if settings.gpus_per_trial else {})}
    trainable = tune.with_resources(interpolation_trial, resources)
    from cbd_ray.storage import filesystem, redact

    fs, root = filesystem(storage)  # Tune's results live in the run directory, local or in object storage
    path = f"{root.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log(f"tune: resuming {name} from {redact(storage)}/{name}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space, storage_filesystem=fs)
    else:
        use_asha = settings.scheduler == "asha" and n_reports > 1
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=n_reports, grace_period=min(2, n_reports),
                                   reduction_factor=2) if use_asha else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler,
                                        num_samples=settings.samples if settings.search == "random" else 1,
                                        reuse_actors=True),  # a fresh worker re-imports torch + transformers
            run_config=tune.RunConfig(name=name, storage_path=root, storage_filesystem=fs, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    return tuner.fit()


def _rows(grid: Any, keys: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        cfg = {**r.config, **(r.config.get("case") or {})}
        m = r.metrics or {}
        row = {k: cfg.get(k) for k in keys}
        row.update({"alpha": m.get("alpha", cfg.get("alpha")), "params": m.get("params"), METRIC: m.get(METRIC),
                    "step": m.get("step"), "iterations": m.get("training_iteration"),
                    "status": "error" if r.error else "ok"})
        if r.error:
            row["error"] = f"{type(r.error).__name__}: {r.error}"[:300]
        rows.append(row)
    return rows


def _common(settings: TuneSettings, train_text: str | os.PathLike, heldout_text: str | os.PathLike,
            resize: Mapping[str, Any] | None) -> dict[str, Any]:
    s = settings.model_dump()
    return {"resize": dict(resize or {}), "train_text": _path_or_ref(train_text),
            "heldout_text": _path_or_ref(heldout_text),
            **{k: s[k] for k in ("recovery_steps", "batch_size", "seq_len", "lr", "eval_every", "eval_windows",
                                 "keep_models", "seed")}}


def _n_reports(settings: TuneSettings) -> int:
    steps = settings.recovery_steps
    return 1 + (steps + settings.eval_every - 1) // settings.eval_every if steps else 1


def run_alpha_search(run_dir: str | os.PathLike, targets: Sequence[Mapping[str, Any]], train_text: str | os.PathLike,
                     heldout_text: str | os.PathLike, settings: TuneSettings | None = None,
                     resize: Mapping[str, Any] | None = None, storage_uri: str | None = None,
                     log: Log = print) -> dict[str, float]:
    """α search for each target ({"name", "small", "large", "shape": {layers, hidden, heads,
    kv_heads?, ffn?}}) on the current Ray. Writes ``<run>/tune/best_alpha.json`` (merged with
    the α an earlier search found for other targets) and the results table and sweep plot
    beside it; returns {target name: best α} of these targets."""
    from ray import tune

    from cbd_ray.report import markdown_table, plot_curves
    from cbd_ray.storage import atomic_write_json, atomic_write_text

    settings = settings or TuneSettings()
    run = Path(run_dir)
    out = run / "tune"
    out.mkdir(parents=True, exist_ok=True)
    if not targets:
        raise CBDError("the α search needs at least one target")
    common = _common(settings, train_text, heldout_text, resize)
    storage = _storage(run, storage_uri)
    rows: list[dict[str, Any]] = []
    best: dict[str, float] = {}
    for t in targets:
        alphas = (tune.grid_search(list(settings.alphas)) if settings.search == "grid"
                  else tune.uniform(0.0, 1.0))
        space = {**common, "small": _path_or_ref(t["small"]), "large": _path_or_ref(t["large"]), "shape": dict(t["shape"]),
                 "out": None if storage_uri else str((out / "models" / t["name"]).resolve()), "alpha": alphas, "target": t["name"]}
        name = _exp_name(f"alpha-{t['name']}", {k: v for k, v in space.items() if k != "alpha"}
                         | {"alphas": settings.alphas, "search": settings.search, "samples": settings.samples,
                            "scheduler": settings.scheduler})
        log(f"tune: α search for {t['name']} ({len(settings.alphas) if settings.search == 'grid' else settings.samples}"
            f" trials, {settings.recovery_steps} recovery steps)")
        grid = _fit(space, settings, storage, name, _n_reports(settings), log)
        trows = _rows(grid, ["target"])
        b = best_of(trows)
        best[t["name"]] = float(b["alpha"])
        for r in trows:
            r["best"] = r is b
        rows += sorted(trows, key=lambda r: float(r["alpha"]))
        log(f"tune: {t['name']}: best α {b['alpha']:.3f} (held-out loss {b[METRIC]:.4f}); "
            + ", ".join(f"α={r['alpha']:.2f}: {r[METRIC]:.4f}" for r in sorted(trows, key=lambda r: r["alpha"])
                        if r.get(METRIC) is not None))
    # A search over some targets keeps what earlier searches found for the others.
    old_rows = out / "alpha_results.json"
    if old_rows.is_file():
        rows = [r for r in json.loads(old_rows.read_text()) if r.get("target") not in best] + rows
    best = {**{k: v for k, v in load_best_alpha(run).items() if k not in best}, **best}
    atomic_write_json(out / "alpha_results.json", rows)
    cols = [("target", "target"), ("alpha", "α"), ("params", "parameters"), (METRIC, "held-out loss"),
            ("step", "recovery steps"), ("status", "status"), ("best", "best")]
    atomic_write_text(out / "alpha_results.md", markdown_table(rows, cols))
    curves = {n: [(float(r["alpha"]), float(r[METRIC])) for r in rows if r["target"] == n and r.get(METRIC) is not None
                  and r["iterations"] == max(x["iterations"] or 0 for x in rows if x["target"] == n)]
              for n in best}
    plot_curves(curves, out / "alpha_sweep.png", xlabel="α (weight of the smaller anchor)", ylabel="held-out loss",
                title="α sweep per target", markers=True)
    atomic_write_json(out / BEST_ALPHA, best)
    return {t["name"]: best[t["name"]] for t in targets}


def density_subsets(n_models: int, densities: Sequence[int]) -> dict[int, list[int]]:
    """{density: indices into the chain (largest first)} of ``density`` models spread
    evenly over the chain, always keeping its first and last; densities above the chain's
    length are left out."""
    out: dict[int, list[int]] = {}
    for d in densities:
        if d > n_models:
            continue
        out[d] = sorted({round(i * (n_models - 1) / (d - 1)) for i in range(d)})
    return out


def _bracketing(chain: Sequence[tuple[str, str]], subset: Sequence[int], shape: Mapping[str, Any],
                resize: Mapping[str, Any]) -> tuple[int, int] | None:
    """(large, small) indices of the smallest adjacent pair of ``subset`` that brackets ``shape``."""
    from cbd_ray.interpolate import AnchorPair, ResizeOptions, Shape

    found = None
    for hi, lo in zip(subset, subset[1:]):
        try:
            AnchorPair(chain[lo][1], chain[hi][1], resize=ResizeOptions(**resize)).validate_target(Shape(**shape))
        except CBDError:
            continue
        found = (hi, lo)
    return found


def run_density_search(run_dir: str | os.PathLike, chain: Sequence[tuple[str, str]],
                       targets: Sequence[Mapping[str, Any]], train_text: str | os.PathLike,
                       heldout_text: str | os.PathLike, settings: TuneSettings | None = None,
                       resize: Mapping[str, Any] | None = None, storage_uri: str | None = None,
                       log: Log = print) -> list[dict[str, Any]]:
    """Chain-density search: ``chain`` is [(name, model dir)] largest first, ``targets``
    [{"name", "shape"}]. One trial per (density, target) whose subset brackets it; writes
    ``<run>/tune/density.json``, ``density.md`` and ``density.png``; returns the rows."""
    from ray import tune

    from cbd_ray.report import markdown_table, plot_curves
    from cbd_ray.storage import atomic_write_json, atomic_write_text

    settings = settings or TuneSettings()
    run = Path(run_dir)
    out = run / "tune"
    out.mkdir(parents=True, exist_ok=True)
    resize = dict(resize or {})
    subsets = density_subsets(len(chain), settings.densities)
    if not subsets:
        raise CBDError(f"densities {settings.densities} all exceed the chain's {len(chain)} models")
    cases, skipped = [], []
    for d, sub in subsets.items():
        for t in targets:
            pair = _bracketing(chain, sub, t["shape"], resize)
            names = ">".join(chain[i][0] for i in sub)
            if pair is None:
                skipped.append({"target": t["name"], "density": d, "anchors": names, "status": "no pair brackets it"})
                continue
            hi, lo = pair
            cases.append({"density": d, "target": t["name"], "anchors": names, "pair": f"{chain[hi][0]}>{chain[lo][0]}",
                          "small": _path_or_ref(chain[lo][1]), "large": _path_or_ref(chain[hi][1]), "shape": dict(t["shape"]),
                          "out": None if storage_uri else str((out / "models" / f"density-{d}" / t["name"]).resolve())})
    if not cases:
        raise CBDError("no (density, target) has a bracketing pair: " + json.dumps(skipped)[:400])
    space = {**_common(settings, train_text, heldout_text, resize), "alpha": "auto", "case": tune.grid_search(cases)}
    name = _exp_name("density", {k: v for k, v in space.items() if k != "case"} | {"cases": cases})
    log(f"tune: chain density search, {len(cases)} trials (densities {sorted(subsets)})")
    grid = _fit(space, settings.model_copy(update={"search": "grid"}), _storage(run, storage_uri), name,
                _n_reports(settings), log)
    rows = _rows(grid, ["target", "density", "anchors", "pair"]) + skipped
    rows.sort(key=lambda r: (str(r["target"]), int(r["density"])))
    atomic_write_json(out / "density.json", rows)
    cols = [("target", "target"), ("params", "parameters"), ("density", "chain models"), ("anchors", "chain used"),
            ("pair", "pair"), ("alpha", "α"), (METRIC, "held-out loss"), ("status", "status")]
    atomic_write_text(out / "density.md", markdown_table(rows, cols))
    curves = {t["name"]: [(float(r["density"]), float(r[METRIC])) for r in rows
                          if r["target"] == t["name"] and r.get(METRIC) is not None] for t in targets}
    if any(curves.values()):
        plot_curves(curves, out / "density.png", xlabel="anchors in the chain", ylabel="held-out loss",
                    title="chain density per target", markers=True)
    for t in targets:
        shown = [f"{r['density']}: {r[METRIC]:.4f}" for r in rows if r["target"] == t["name"] and r.get(METRIC) is not None]
        log(f"tune: density {t['name']}: " + (", ".join(shown) or "no bracketing pair"))
    return rows


# --------------------------------------------------------------------------- the run directory


def chain_models(cfg: Any, run_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """[(name, model dir)] of the built chain of ``cfg`` in ``run_dir``, largest first
    ("source" then the anchors). Raises CBDError naming the stage when it is not built."""
    from cbd_ray.manifest import Manifest
    from cbd_ray.stages.chain import build_stages
    from cbd_ray.stages.models import model_dir_of

    run = Path(run_dir)
    stages = {s.name: s for s in build_stages(cfg)}
    top = [n for n in ("source", "source_sft", "bridge") if n in stages][-1]
    names = [top] + [f"chain_{i + 1}" for i in range(len(cfg.anchors))]
    labels = ["source"] + [a.name for a in cfg.anchors]
    man = Manifest.load(run)
    out = []
    for stage, label in zip(names, labels):
        rec = man.get(stage)
        if rec is None or rec.get("status") != "done":
            raise CBDError(f"the chain in {run} is not built: stage {stage!r} is "
                           f"{(rec or {}).get('status', 'missing')}; run jobs/build_chain.py first")
        out.append((label, model_dir_of(run / (rec.get("outputs") or {}).get("path", stages[stage].out_rel))))
    return out


def _as_refs(run_dir: Path, uri: str, chain: Sequence[tuple[str, str]],
             texts: tuple[Path, Path]) -> tuple[list[tuple[str, Any]], tuple[Any, Any]]:
    """The chain's models and texts as storage references under the run URI."""
    from cbd_ray.manifest import Manifest
    from cbd_ray.storage import make_ref, uri_join

    man = Manifest.load(run_dir)
    sums = {(r.get("outputs") or {}).get("path"): (r.get("outputs") or {}).get("checksums", {})
            for r in man.stages.values()}

    def ref(p: Path, file: str | None = None) -> Any:
        rel = Path(p).resolve().relative_to(run_dir.resolve()).as_posix()
        if rel not in sums:
            return str(p)  # a model referenced in place (hub name or shared directory)
        ck = {k: v for k, v in sums[rel].items() if file is None or k == file}
        return make_ref(uri_join(uri, rel), ck, file=file, local=str(Path(p) / file if file else p))

    return ([(n, ref(Path(d)) if Path(d).is_dir() else d) for n, d in chain],
            (ref(texts[0].parent, texts[0].name), ref(texts[1].parent, texts[1].name)))


def chain_targets(cfg: Any, chain: Sequence[tuple[str, str]], names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The grid targets of ``cfg`` with their bracketing pair's directories."""
    from cbd_ray.schema import target_pair

    known = [t.label for t in cfg.grid.targets]
    if names:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"unknown target(s) {', '.join(unknown)}; the grid has: {', '.join(known)}")
    out = []
    for t in cfg.grid.targets:
        if names and t.label not in names:
            continue
        pair = target_pair(cfg, t)
        if pair is None:
            raise ConfigError(f"grid target {t.label} lies outside every adjacent anchor pair")
        hi, lo = pair
        shape = {k: getattr(t, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn") if getattr(t, k) is not None}
        out.append({"name": t.label, "shape": shape, "large": chain[hi][1], "small": chain[lo][1],
                    "pair": f"{chain[hi][0]}>{chain[lo][0]}", "alpha": t.alpha})
    return out


def resize_fields(cfg: Any, run_dir: str | os.PathLike) -> dict[str, Any]:
    """The grid's ResizeOptions fields (with calibration text from the run's data when set)."""
    import dataclasses

    opts = resize_options(cfg, Path(run_dir) / "data")
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}


def build_chain(cfg: Any, storage: str | None = None, log: Log = print) -> tuple[Path, str | None]:
    """Build or reuse the chain of ``cfg`` (intact stages are skipped); returns the local run
    directory and the remote run URI (None for a local run)."""
    from cbd_ray.stages.chain import run_chain

    res = run_chain(cfg, storage=storage, log=log)
    from cbd_ray.storage import is_remote

    return Path(res["run_dir"]), (res["uri"] if is_remote(res["uri"]) else None)


def tune_chain(cfg: Any, settings: TuneSettings | None = None, storage: str | None = None, build: bool = True,
               density: bool = True, log: Log = print) -> dict[str, Any]:
    """Build or reuse the chain of ``cfg``, then run the α search (and the density search)
    on Ray. Returns {"run_dir", "best_alpha", "density"}. The run directory's lease
    (cbd_ray.lease) is held throughout, so no other driver builds or searches it meanwhile;
    the chain build inside shares it."""
    from cbd_ray.lease import hold_run_dir
    from cbd_ray.storage import check_writable

    check_writable(storage or cfg.run.storage)
    with hold_run_dir(resolve_run_dir(cfg, storage)[0], cfg.run.lease_timeout_s):
        return _tune_held(cfg, settings or TuneSettings(), storage, build, density, log)


def _tune_held(cfg: Any, settings: TuneSettings, storage: str | None, build: bool, density: bool,
               log: Log) -> dict[str, Any]:
    """tune_chain's work once the run directory's lease is held."""
    from cbd_ray.session import connect_ray as ensure_ray
    from cbd_ray.storage import sync_up, uri_join

    started = ensure_ray()
    try:
        if build:
            run_dir, uri = build_chain(cfg, storage, log)
        else:
            uri_, run_dir, remote = resolve_run_dir(cfg, storage)
            uri = uri_ if remote else None
        chain = chain_models(cfg, run_dir)
        texts: tuple[Any, Any] = (run_dir / "data" / "text_train.txt", run_dir / "data" / "text_heldout.txt")
        if uri:  # trials run on other nodes: they get storage references, never the driver's paths
            chain, texts = _as_refs(run_dir, uri, chain, texts)
        targets = chain_targets(cfg, chain, settings.targets)
        resize = resize_fields(cfg, run_dir)
        best = run_alpha_search(run_dir, targets, *texts, settings=settings, resize=resize, storage_uri=uri, log=log)
        rows = (run_density_search(run_dir, chain, targets, *texts, settings=settings, resize=resize,
                                   storage_uri=uri, log=log) if density and settings.densities else [])
        if uri:
            sync_up(run_dir / "tune", uri_join(uri, "tune"))
        return {"run_dir": run_dir, "best_alpha": best, "density": rows}
    finally:
        if started:
            import ray

            ray.shutdown()

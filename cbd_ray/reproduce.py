"""The paper's comparisons: CBD against its baselines at one shape, the same budget after.

For every target shape of a chain config, every method of :mod:`cbd_ray.baselines`
initialises a model for every seed; each is fine-tuned on the same downstream data with the
same budget (same steps, batches in the same order per seed: cbd_ray.finetune), its held-out
loss curve is recorded, and it is evaluated the same way (held-out loss, and tasks of
cbd_ray.evaluate when configured). ``<run>/report.md`` then shows a row per method and target
with mean ± std over the seeds, the plots (scores by size per method, loss curves of CBD
against Rand, the α sweep and the chain density), and the convergence speed-up: the steps CBD
needs to reach Rand's final loss.

No search sees the numbers reported: the held-out text is cut in two, a **validation**
split on which α and chain density are searched, and a **test** split on which every
method's loss curve and the report's figures are measured.

Run directory (``<storage>/<run.name>``)::

    chain/                 the chain's own run directory (jobs/build_chain.py layout);
      tune/                α and chain-density searches on the validation split (cbd_ray.stages.tune)
    reproduce/data/        train.txt, val.txt, test.txt: the downstream text every method sees
    reproduce/<target>/<method>/seed-<s>/init/         the initialised model
    reproduce/<target>/<method>/seed-<s>/result.json   its fine-tuning curve and scores
    plots/*.png  results.json (per seed)  summary.json (mean ± std)  report.md

A rerun reuses the chain and the searches and skips every (target, method, seed) whose
result.json was made with the same settings.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, PositiveInt

from cbd_ray.baselines import (init_auto_learngene, init_cbd, init_direct_kd, init_prune, init_prune_kd, init_rand,
                               init_single, init_van_learngene, recover)
from cbd_ray.config import Strict, apply_overrides, build, config_hash, load_yaml
from cbd_ray.errors import CBDError, ConfigError
from cbd_ray.schema import RunSpec, parse_config, with_chain_text
from cbd_ray.stages.tune import TuneSettings

Log = Callable[[str], None]
Method = Literal["cbd", "prune", "rand", "single", "direct_kd", "auto_learngene", "van_learngene",
                 "prune_kd", "cbd_recover", "rand_pt", "cbd_noalign"]
LABELS = {"cbd": "CBD", "prune": "Prune", "rand": "Rand", "single": "Single", "direct_kd": "Direct KD",
          "auto_learngene": "Auto-Learngene", "van_learngene": "Van-Learngene", "prune_kd": "Prune + KD",
          "cbd_recover": "CBD + recovery", "cbd_noalign": "CBD, no alignment"}
#: the methods a comparison runs when its config names none (the paper's table)
DEFAULT_METHODS = ["cbd", "prune", "rand", "single", "direct_kd", "auto_learngene", "van_learngene"]


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
    val_fraction: float = Field(default=0.5, gt=0, lt=1)      # of the held-out text: validation (searches)
    keep_models: bool = False  # keep the fine-tuned models (tasks are scored before they go)
    #: a text file of another domain: the fine-tuned model's loss on its last heldout_fraction
    #: (eval_windows windows of seq_len) is reported as ``second_loss``
    second_domain: str | None = None


class RandPretrainSpec(Strict):
    """``rand_pt``: Rand pre-trained on the chain's text (cbd_ray.stages.models.pretrain_lm)
    for each budget, in multiples of the tokens the chain's students trained on (the chain
    steps' ``student_tokens``): the paper's convergence comparison against Rand given
    pre-training. Each budget is a method of its own, ``rand_pt<b>x``."""

    budgets: list[float] = Field(default=[1.0, 4.0, 16.0], min_length=1)
    batch_size: PositiveInt = 16
    seq_len: PositiveInt = 64
    lr: float = Field(default=2e-3, gt=0, lt=1)
    warmup: PositiveInt = 50  # steps; the rate is constant after them (so every budget is a prefix of the largest)
    targets: list[str] | None = None  # the targets it runs on (None: all); pre-training is the costly baseline


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
    methods: list[Method] = Field(default=list(DEFAULT_METHODS), min_length=1)
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)  # every method runs once per seed
    targets: list[str] | None = None              # None: every grid target of the chain
    alpha: Literal["best", "auto"] | float = "best"  # best: from the α search on the validation split
    density: bool = True                          # also run the chain-density search (validation split)
    tune: TuneSettings = TuneSettings()
    finetune: FinetuneSpec = FinetuneSpec()
    learngene: LearngeneSpec = LearngeneSpec()
    direct_kd: dict[str, Any] = {}                # distill overrides on top of the first chain step's (prune_kd too)
    #: cbd_recover: distill overrides (on the first chain step's) of the short distillation of
    #: each blended target from its larger anchor (never the source)
    recover: dict[str, Any] = {"steps": 10}
    rand_pretrain: RandPretrainSpec = RandPretrainSpec()
    evaluation: ReproEvalSpec = ReproEvalSpec()
    cpus_per_task: float = Field(default=1, gt=0)
    gpus_per_task: float = Field(default=0, ge=0)

    def model_post_init(self, __context: Any) -> None:
        if isinstance(self.alpha, float) and not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1], 'auto' or 'best'")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods {self.methods} repeat a method")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed")
        bad = [b for b in self.rand_pretrain.budgets if not b > 0]
        if bad or len(set(self.rand_pretrain.budgets)) != len(self.rand_pretrain.budgets):
            raise ValueError(f"rand_pretrain.budgets {self.rand_pretrain.budgets} must be distinct numbers > 0")

    def variants(self) -> list[str]:
        """The methods as run and reported: ``rand_pt`` becomes one ``rand_pt<b>x`` per budget."""
        out: list[str] = []
        for m in self.methods:
            out += [f"rand_pt{b:g}x" for b in self.rand_pretrain.budgets] if m == "rand_pt" else [m]
        return out


def label_of(method: str) -> str:
    """A method's name in tables (``rand_pt4x``: "Rand + PT 4×")."""
    if method.startswith("rand_pt") and method.endswith("x"):
        return f"Rand + PT {method[7:-1]}×"
    return LABELS.get(method, method)


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
    known = [t.label for t in chain.grid.targets]
    bad = [t for t in cfg.rand_pretrain.targets or [] if t not in known]
    if bad:
        raise ConfigError(f"rand_pretrain.targets: {', '.join(bad)} not in the chain's grid; it has: {', '.join(known)}")
    from cbd_ray.train import DistillConfig

    if {"direct_kd", "prune_kd"} & set(cfg.methods):
        build(DistillConfig, {**chain.step_distill(0), **cfg.direct_kd}, source=f"{path}: direct_kd")
    if "cbd_recover" in cfg.methods:
        build(DistillConfig, {**chain.step_distill(0), **cfg.recover}, source=f"{path}: recover")
    if cfg.finetune.second_domain is not None and not Path(cfg.finetune.second_domain).is_file():
        raise ConfigError(f"finetune.second_domain: {cfg.finetune.second_domain!r} is not a file")
    return cfg, chain


# --------------------------------------------------------------------------- data


def _split_heldout(held: str, val_fraction: float) -> tuple[str, str]:
    """Cut held-out text (or rendered records) into (validation, test) at a paragraph break
    near ``val_fraction`` of its length, so no window straddles the two."""
    cut = int(len(held) * val_fraction)
    brk = held.find("\n\n", cut)
    cut = brk if 0 < brk < len(held) - 2 else cut
    return held[:cut], held[cut:]


def _downstream(cfg: ReproduceConfig, chain_run: Path, out: Path) -> dict[str, Path]:
    """Write the downstream train / validation / test text every method sees; returns
    {"train", "val", "test"} paths. Searches read val, the report's figures test."""
    from cbd_ray.data import render_prompt
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
    val, test = _split_heldout(held, cfg.finetune.val_fraction)
    if not val.strip() or not test.strip():
        raise CBDError(f"the held-out text ({len(held):,} chars) is too short to split into validation and test")
    paths = {"train": out / "train.txt", "val": out / "val.txt", "test": out / "test.txt"}
    for k, v in (("train", train), ("val", val), ("test", test)):
        atomic_write_text(paths[k], v)
    return paths


# --------------------------------------------------------------------------- one (target, method)


def finetune_and_score(init_dir: str, train_path: str, heldout_path: str, ft: dict[str, Any], seed: int,
                       tasks: list[str], data_dir: str | None, limit: int | None, eval_batch: int,
                       work_dir: str) -> dict[str, Any]:
    """Fine-tune the model in ``init_dir`` with the common budget and score it (one Ray task)."""
    from cbd_ray.finetune import finetune_lm

    keep = ft.get("keep_models", False)
    second = ft.get("second_domain")
    out = Path(work_dir) / "finetuned"
    if out.exists():
        shutil.rmtree(out)
    res = finetune_lm(init_dir, Path(train_path).read_text(), Path(heldout_path).read_text(), steps=ft["steps"],
                      batch_size=ft["batch_size"], seq_len=ft["seq_len"], lr=ft["lr"], eval_every=ft["eval_every"],
                      eval_windows_n=ft["eval_windows"], seed=seed, out_dir=out if (tasks or keep or second) else None,
                      log=lambda s: print(f"{Path(work_dir).parent.name}/{Path(work_dir).name}: {s}", flush=True))
    if second:
        res["second_loss"] = second_domain_loss(out, second, ft)
    if tasks:
        from cbd_ray.evaluate import evaluate_model

        res["tasks"] = evaluate_model(out, tasks, data_dir=data_dir, limit=limit, batch_size=eval_batch,
                                      device="auto", progress=False)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return res


def second_domain_loss(model_dir: str | os.PathLike, text_path: str, ft: dict[str, Any]) -> float:
    """Mean next-token NLL of the model on the last ``heldout_fraction`` of another domain's
    text (``eval_windows`` fixed windows of ``seq_len`` tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cbd_ray.finetune import text_loss

    text = Path(text_path).read_text(encoding="utf-8")
    tail = text[int(len(text) * (1 - ft["heldout_fraction"])):]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True).eval()
    return text_loss(model, AutoTokenizer.from_pretrained(str(model_dir)), tail, ft["seq_len"], ft["eval_windows"])


def _params(model_dir: Path) -> int:
    from cbd_ray.resize import Checkpoint

    return int(Checkpoint(model_dir).params)


def _init(method: str, t: dict[str, Any], source: str, out: Path, cfg: ReproduceConfig, chain_cfg: Any,
          chain_run: Path, alpha: float | str, seed: int, log: Log) -> dict[str, Any]:
    """Initialise one method's model for target ``t`` with ``seed``; returns provenance for
    the results row."""
    shape = t["shape"]
    lg = cfg.learngene
    if method in ("cbd", "cbd_noalign"):  # align auto: on for anchors trained apart (cbd_ray.align)
        init_cbd(t["small"], t["large"], shape, out, alpha=alpha, resize=t["resize"], overwrite=True,
                 align="off" if method == "cbd_noalign" else "auto")
        info = json.loads((out / "baseline.json").read_text())
        return {"alpha": info["alpha"], "from": t["pair"], **({"aligned": info["aligned"]} if "aligned" in info else {})}
    if method == "prune":
        init_prune(source, shape, out, resize=t["resize"], overwrite=True)
        return {"from": "source pruned"}
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
    if method in ("direct_kd", "prune_kd"):
        return _init_kd(method, t, source, out, cfg, chain_cfg, chain_run, seed, log)
    if method == "cbd_recover":
        return _init_recover(t, source, out, cfg, chain_cfg, chain_run, alpha, seed, log)
    if method.startswith("rand_pt"):
        return _init_rand_pt(method, t, source, out, cfg, chain_run, seed, log)
    raise CBDError(f"unknown method {method!r}; allowed: {', '.join(cfg.variants())}")


def _init_kd(method: str, t: dict[str, Any], source: str, out: Path, cfg: ReproduceConfig, chain_cfg: Any,
             chain_run: Path, seed: int, log: Log) -> dict[str, Any]:
    """Direct KD (from random) or Prune + KD (from the pruned source): the same settings, so
    the same teacher tokens per target."""
    settings = with_chain_text({**chain_cfg.step_distill(0), **cfg.direct_kd, "seed": seed},
                               str(chain_run / "data" / "text_train.txt"))
    work = out.parent / "kd_work"
    shutil.rmtree(work, ignore_errors=True)  # a stale half-run of other settings must not be resumed
    data, ev = chain_run / "data" / "train.jsonl", chain_run / "data" / "eval.jsonl"
    corpus = shared_corpus(settings, source, chain_run)
    if method == "direct_kd":
        init_direct_kd(source, t["shape"], out, data, settings, eval_data=ev, seed=seed, work_dir=work,
                       overwrite=True, log=log, lm_data=corpus)
    else:
        init_prune_kd(source, t["shape"], out, data, settings, eval_data=ev, seed=seed, resize=t["resize"],
                      work_dir=work, overwrite=True, log=log, lm_data=corpus)
    shutil.rmtree(work, ignore_errors=True)
    m = json.loads((out / "baseline.json").read_text()).get("metrics") or {}
    return {"from": "source (direct)" if method == "direct_kd" else "source pruned, then distilled",
            "teacher_tokens": int(m.get("teacher_tokens") or 0), "distill_steps": settings.get("steps")}


def shared_corpus(settings: dict[str, Any], tokenizer_dir: str, chain_run: Path) -> dict | None:
    """MiniLLM's pretraining text of a distillation outside the chain, as a token corpus in the
    chain's ``corpora/`` (cbd_ray.corpus): built by the first run that needs it, or found there
    from the chain's own steps, and reused by every later one instead of each run building its
    own. None when the settings read no pretraining text."""
    from cbd_ray.config import build
    from cbd_ray.train import DistillConfig, lm_corpus

    cfg = build(DistillConfig, settings, source="distill")
    return lm_corpus(cfg, None, tokenizer_dir, str(chain_run / "corpora"))


def _init_recover(t: dict[str, Any], source: str, out: Path, cfg: ReproduceConfig, chain_cfg: Any,
                  chain_run: Path, alpha: float | str, seed: int, log: Log) -> dict[str, Any]:
    """CBD, then a short distillation from the target's larger anchor. A target whose larger
    model is the chain's source is left as blended: CBD never calls the source again."""
    blend = out.parent / "blend"
    init_cbd(t["small"], t["large"], t["shape"], blend, alpha=alpha, resize=t["resize"], overwrite=True)
    a = json.loads((blend / "baseline.json").read_text())["alpha"]
    if Path(t["large"]).resolve() == Path(source).resolve():
        if out.exists():
            shutil.rmtree(out)
        os.replace(blend, out)
        return {"alpha": a, "from": f"{t['pair']} (not recovered: its larger model is the source)",
                "anchor_teacher_tokens": 0}
    settings = with_chain_text({**chain_cfg.step_distill(0), **cfg.recover, "seed": seed},
                               str(chain_run / "data" / "text_train.txt"))
    work = out.parent / "recover_work"
    shutil.rmtree(work, ignore_errors=True)
    recover(blend, t["large"], out, chain_run / "data" / "train.jsonl", settings,
            eval_data=chain_run / "data" / "eval.jsonl", seed=seed, work_dir=work, overwrite=True, log=log,
            lm_data=shared_corpus(settings, t["large"], chain_run))
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(blend, ignore_errors=True)
    m = json.loads((out / "baseline.json").read_text()).get("metrics") or {}
    large = t["pair"].split(">")[0]
    return {"alpha": a, "from": f"{t['pair']}, recovered from {large}",
            "anchor_teacher_tokens": int(m.get("teacher_tokens") or 0), "distill_steps": settings.get("steps")}


def chain_student_tokens(chain_run: Path) -> int:
    """Tokens the chain's students trained on: the chain steps' ``student_tokens`` (the unit
    of Rand's pre-training budgets)."""
    from cbd_ray.manifest import Manifest

    stages = Manifest.load(chain_run).stages
    return sum(int((v.get("metrics") or {}).get("student_tokens") or 0) for k, v in stages.items()
               if k.startswith("chain_"))


def _init_rand_pt(method: str, t: dict[str, Any], source: str, out: Path, cfg: ReproduceConfig, chain_run: Path,
                  seed: int, log: Log) -> dict[str, Any]:
    """Rand pre-trained on the chain's text for ``b`` times the chain's student tokens. Every
    budget of a (target, seed) comes from one run to the largest budget, at a constant rate
    after a fixed warm-up, saved when each budget is reached: with that schedule the first k
    steps are the same whatever the run's length, so each snapshot is exactly the shorter run."""
    import math

    from cbd_ray.stages.models import pretrain_lm
    from cbd_ray.storage import atomic_write_json

    p = cfg.rand_pretrain
    unit = chain_student_tokens(chain_run)
    if unit <= 0:
        raise CBDError(f"{method}: the chain's steps record no student tokens, so no pre-training budget")
    block = p.batch_size * p.seq_len
    steps = {b: max(1, math.ceil(b * unit / block)) for b in p.budgets}
    b = float(method[len("rand_pt"):-1])
    shared = out.parent.parent.parent / "rand_pt" / f"seed-{seed}"  # <target>/rand_pt/seed-<s>
    key = {"steps": sorted(steps.values()), "rand_pretrain": p.model_dump(), "unit": unit, "seed": seed,
           "source": str(source), "shape": t["shape"]}
    snap = shared / f"step-{steps[b]}"
    done = shared / "key.json"
    if not (done.is_file() and json.loads(done.read_text()) == key and (snap / "config.json").is_file()):
        shutil.rmtree(shared, ignore_errors=True)
        init_rand(source, t["shape"], shared / "init", seed=seed, overwrite=True)
        last = max(steps.values())
        log(f"rand_pt: {t['name']} seed {seed}: pre-training {last} steps ({last * block:,} tokens), "
            f"kept at {', '.join(f'{k:g}x' for k in sorted(steps))}")
        pretrain_lm(str(shared / "init"), (chain_run / "data" / "text_train.txt").read_text(),
                    str(shared / f"step-{last}"), str(shared / "work"), last, p.batch_size, p.seq_len, p.lr,
                    checkpoint_every=last, seed=seed, log=lambda s: None, warmup=p.warmup,
                    snapshots={n: str(shared / f"step-{n}") for n in steps.values() if n < last})
        shutil.rmtree(shared / "work", ignore_errors=True)
        atomic_write_json(done, key)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(snap, out)
    return {"from": f"random init pre-trained on {steps[b] * block:,} tokens ({b:g}x the chain's)",
            "pretrain_tokens": steps[b] * block}


# --------------------------------------------------------------------------- the run


def resolve_run(cfg: ReproduceConfig, storage: str | None) -> tuple[Path, str | None]:
    from cbd_ray.storage import is_remote, local_path, uri_join

    root = storage or cfg.run.storage
    if is_remote(root):
        local = Path(os.environ.get("CBD_LOCAL_RUNS", Path.home() / ".cache" / "cbd_ray" / "runs")) / cfg.run.name
        return local, uri_join(root, cfg.run.name)
    return local_path(root).expanduser().resolve() / cfg.run.name, None


def _searches(cfg: ReproduceConfig, chain_cfg: Any, chain_run: Path, texts: dict[str, Path],
              log: Log) -> tuple[list[tuple[str, str]], list[dict[str, Any]], dict[str, float]]:
    """The built chain, its targets (with resize options) and the α search's best α per
    target; α and density are searched on the validation split only."""
    from cbd_ray.interpolate import ResizeOptions
    from cbd_ray.stages.tune import (chain_models, chain_targets, resize_fields, run_alpha_search,
                                     run_density_search)

    chain = chain_models(chain_cfg, chain_run)
    targets = chain_targets(chain_cfg, chain, cfg.targets)
    resize = resize_fields(chain_cfg, chain_run)
    for t in targets:
        t["resize"] = ResizeOptions(**resize)
    split = (texts["train"], texts["val"])
    best: dict[str, float] = {}
    if cfg.alpha == "best":
        best = run_alpha_search(chain_run, targets, *split, settings=cfg.tune, resize=resize, log=log)
    if cfg.density and cfg.tune.densities and len(chain) > 2:
        run_density_search(chain_run, chain, targets, *split, settings=cfg.tune, resize=resize, log=log)
    return chain, targets, best


def _launch(cfg: ReproduceConfig, chain_cfg: Any, run_dir: Path, chain: list[tuple[str, str]],
            targets: list[dict[str, Any]], best: dict[str, float], texts: dict[str, Path],
            log: Log) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], Path, Any, str]]]:
    """Initialise every (target, method, seed) not already done with the same settings and
    start its fine-tuning as a Ray task; returns (reused rows, pending)."""
    import ray

    chain_run = run_dir / "chain"
    source = chain[0][1]
    ft = cfg.finetune.model_dump()
    ev = cfg.evaluation
    settings_key = {"finetune": ft, "evaluation": ev.model_dump(), "learngene": cfg.learngene.model_dump(),
                    "direct_kd": cfg.direct_kd, "protocol": "val-search/test-report",
                    "data": config_hash("\0".join(texts[k].read_text() for k in ("train", "val", "test")))}
    task = ray.remote(finetune_and_score).options(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task or None,
                                                  max_retries=0)
    rows: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], Path, Any, str]] = []
    digest = _chain_digest(chain_run)
    for t in targets:
        # best: the searched α (the grid's own α, else auto, for a target the search left out)
        alpha: float | str = best.get(t["name"], t.get("alpha") or "auto") if cfg.alpha == "best" else cfg.alpha
        for method in cfg.variants():
            if method.startswith("rand_pt") and t["name"] not in (cfg.rand_pretrain.targets or [t["name"]]):
                continue
            for seed in cfg.seeds:
                d = run_dir / "reproduce" / t["name"] / method / f"seed-{seed}"
                key = config_hash({**settings_key, "method": method, "alpha": alpha, "target": t["shape"],
                                   "seed": seed, "anchors": [t["small"], t["large"]], "chain": digest,
                                   **_method_settings(cfg, method)})
                row = {"target": t["name"], "method": method, "label": label_of(method), "seed": seed}
                prev = json.loads((d / "result.json").read_text()) if (d / "result.json").is_file() else {}
                if prev.get("key") == key:
                    log(f"reproduce: {t['name']}/{method}/seed {seed}: reusing its result")
                    rows.append(prev["row"])
                    continue
                info = _init(method, t, source, d / "init", cfg, chain_cfg, chain_run, alpha, seed, log)
                row.update(info, params=_params(d / "init"))
                ref = task.remote(str(d / "init"), str(texts["train"]), str(texts["test"]), ft, seed, list(ev.tasks),
                                  ev.data_dir, ev.limit, ev.batch_size, str(d))
                pending.append((row, d, ref, key))
    return rows, pending


def _method_settings(cfg: ReproduceConfig, method: str) -> dict[str, Any]:
    """Settings only some methods use, in their result keys only (other methods' results stay valid)."""
    if method == "cbd_recover":
        return {"recover": cfg.recover}
    if method.startswith("rand_pt"):
        return {"rand_pretrain": cfg.rand_pretrain.model_dump()}
    return {}


def _collect(pending: list[tuple[dict[str, Any], Path, Any, str]], log: Log) -> list[dict[str, Any]]:
    """Wait for every fine-tuning task and write its result.json."""
    import ray

    from cbd_ray.storage import atomic_write_json

    rows = []
    for row, d, ref, key in pending:
        res = ray.get(ref)
        row.update(status="ok", initial_loss=res["initial_eval"], final_loss=res["final_eval"],
                   eval_curve=res["eval_curve"], train_curve=res["train_curve"], tokens=res["tokens"],
                   seconds=res["seconds"])
        if res.get("second_loss") is not None:
            row["second_loss"] = res["second_loss"]
        for tr in res.get("tasks") or []:
            for k, v in tr["metrics"].items():
                if not k.endswith("_stderr"):
                    row[f"{tr['task']}.{k}"] = v
        atomic_write_json(d / "result.json", {"key": key, "row": row})
        log(f"reproduce: {row['target']:>12} {row['label']:<15} seed {row['seed']} test loss "
            f"{row['initial_loss']:.4f} -> {row['final_loss']:.4f}")
        rows.append(row)
    return rows


def run_reproduce(cfg: ReproduceConfig, chain_cfg: Any, storage: str | None = None, log: Log = print,
                  command: str | None = None) -> dict[str, Any]:
    """Build or reuse the chain, search α and density on the validation split, initialise
    every method for every target and seed, fine-tune and score them on the test split, and
    write ``<run>/report.md``. Returns {"run_dir", "rows", "summary", "report"}. The run
    directory's lease (cbd_ray.lease) is held throughout: a second driver is refused before it
    writes anything or starts Ray."""
    from cbd_ray.lease import hold_run_dir
    from cbd_ray.storage import check_writable

    t_start = time.perf_counter()
    run_dir, uri = resolve_run(cfg, storage)
    check_writable(str(run_dir.parent) if uri is None else uri)
    with hold_run_dir(uri or str(run_dir), cfg.run.lease_timeout_s):
        return _reproduce_held(cfg, chain_cfg, run_dir, uri, log, command, t_start)


def _reproduce_held(cfg: ReproduceConfig, chain_cfg: Any, run_dir: Path, uri: str | None, log: Log,
                    command: str | None, t_start: float) -> dict[str, Any]:
    """run_reproduce's work once the run directory's lease is held."""
    import ray

    from cbd_ray.lease import LEASE_FILE
    from cbd_ray.session import connect_ray as ensure_ray
    from cbd_ray.stages.chain import run_chain
    from cbd_ray.storage import atomic_write_json, redact, sync_down, sync_up

    leases = (LEASE_FILE, f"chain/{LEASE_FILE}")  # the leases live in storage only, never copied
    run_dir.mkdir(parents=True, exist_ok=True)
    if uri:  # only "not found" means a new run; any other storage error stops here
        n = sync_down(uri, run_dir, exclude=leases)
        log(f"storage: {n} file(s) fetched from {redact(uri)}")
    chain_cfg = chain_cfg.model_copy(update={"run": chain_cfg.run.model_copy(update={"name": "chain",
                                                                                    "storage": str(run_dir)})})
    started = ensure_ray()
    try:
        log(f"reproduce {cfg.run.name}: building or reusing the chain in {run_dir / 'chain'}")
        run_chain(chain_cfg, log=log)
        texts = _downstream(cfg, run_dir / "chain", run_dir / "reproduce" / "data")
        chain, targets, best = _searches(cfg, chain_cfg, run_dir / "chain", texts, log)
        rows, pending = _launch(cfg, chain_cfg, run_dir, chain, targets, best, texts, log)
        log(f"reproduce: fine-tuning {len(pending)} model(s), {cfg.finetune.steps} steps each")
        rows += _collect(pending, log)
        order = {m: i for i, m in enumerate(cfg.variants())}
        tnames = [t["name"] for t in targets]
        rows.sort(key=lambda r: (tnames.index(r["target"]), order[r["method"]], r["seed"]))
        add_convergence(rows)
        summary = summarise(rows)
        atomic_write_json(run_dir / "results.json", rows)
        atomic_write_json(run_dir / "summary.json", summary)
        report = write_reproduce_report(run_dir, cfg, chain, targets, rows, best, command=command,
                                        seconds=time.perf_counter() - t_start, summary=summary)
        if uri:
            sync_up(run_dir, uri, exclude=leases)
        log(f"reproduce {cfg.run.name}: report {report}")
        return {"run_dir": run_dir, "rows": rows, "summary": summary, "report": report}
    finally:
        if started:
            ray.shutdown()


def _chain_digest(chain_run: Path) -> str:
    from cbd_ray.manifest import Manifest

    stages = Manifest.load(chain_run).stages
    return config_hash({k: (v.get("outputs") or {}).get("digest") for k, v in sorted(stages.items())})


def add_convergence(rows: list[dict[str, Any]]) -> None:
    """Per target and seed: ``rand_final`` (Rand's test loss after the budget, same seed)
    and, for every method, ``steps_to_rand`` (steps until its test loss reaches Rand's final
    loss, interpolated between evaluations; None when it never does) and ``speedup`` (Rand's
    own steps to that loss divided by the method's)."""
    from cbd_ray.finetune import steps_to_reach

    for target, seed in dict.fromkeys((r["target"], r.get("seed", 0)) for r in rows):
        group = [r for r in rows if r["target"] == target and r.get("seed", 0) == seed and r.get("status") == "ok"]
        rand = next((r for r in group if r["method"] == "rand"), None)
        if rand is None:
            continue
        level = rand["final_loss"]
        rand_steps = steps_to_reach(rand["eval_curve"], level)
        for r in group:
            s = steps_to_reach(r["eval_curve"], level)
            r["rand_final"] = level
            r["delta_vs_rand"] = r["final_loss"] - level
            r["steps_to_rand"] = s
            r["speedup"] = (rand_steps / s) if s and rand_steps else None  # None for 0 steps: unbounded


def _scores(rows: list[dict[str, Any]]) -> list[str]:
    """Scores beside the test loss: the second domain's loss and the tasks' metrics
    (``<task>.<metric>``), in first-seen order."""
    keys = [k for r in rows for k, v in r.items()
            if (k == "second_loss" or "." in k) and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return list(dict.fromkeys(keys))


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, method): mean and sample std over the seeds of the losses at
    init and after fine-tuning, Δ vs Rand, steps to Rand's final loss (over the seeds that
    reach it; ``reached`` counts them), teacher tokens, and the mean test-loss curve."""
    out = []
    for target, method in dict.fromkeys((r["target"], r["method"]) for r in rows):
        ok = [r for r in rows if r["target"] == target and r["method"] == method and r.get("status") == "ok"]
        if not ok:
            continue
        first = ok[0]
        row: dict[str, Any] = {k: first.get(k) for k in ("target", "method", "label", "params", "from")}
        row["seeds"] = [r["seed"] for r in ok]
        for k in ("initial_loss", "final_loss", "delta_vs_rand"):
            row[f"{k}_mean"], row[f"{k}_std"] = _mean_std([r[k] for r in ok if r.get(k) is not None])
        reached = [r["steps_to_rand"] for r in ok if r.get("steps_to_rand") is not None]
        row["steps_to_rand_mean"], row["steps_to_rand_std"] = _mean_std(reached)
        row["reached"] = f"{len(reached)}/{len(ok)}"
        if any("alpha" in r for r in ok):
            row["alpha"] = first.get("alpha")
        for k in _scores(ok):
            row[f"{k}_mean"], row[f"{k}_std"] = _mean_std([r[k] for r in ok if r.get(k) is not None])
        for k in ("teacher_tokens", "anchor_teacher_tokens", "pretrain_tokens"):
            if any(k in r for r in ok):
                row[f"{k}_mean"], _ = _mean_std([float(r.get(k) or 0) for r in ok])
        steps = [s for s, _ in ok[0]["eval_curve"]]
        row["eval_curve_mean"] = [[s, statistics.fmean(r["eval_curve"][i][1] for r in ok)] for i, s in enumerate(steps)]
        out.append(row)
    return out


# --------------------------------------------------------------------------- the report


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU"


def _pm(row: dict[str, Any], key: str, digits: int = 3) -> str:
    m, sd = row.get(f"{key}_mean"), row.get(f"{key}_std")
    return "" if m is None else f"{m:.{digits}f} ± {sd:.{digits}f}"


def _table(summary: list[dict[str, Any]]) -> str:
    """The report's main table: one row per (target, method), mean ± std over the seeds."""
    from cbd_ray.report import markdown_table

    rows = [{"target": r["target"], "method": r["label"], "params": r["params"], "from": r.get("from"),
             "seeds": len(r["seeds"]), "init": _pm(r, "initial_loss"), "final": _pm(r, "final_loss"),
             "delta": _pm(r, "delta_vs_rand"), "steps": _pm(r, "steps_to_rand", 1), "reached": r["reached"],
             **{k: _pm(r, k) for k in _summary_scores(summary)}}
            for r in summary]
    cols = [("target", "target"), ("method", "method"), ("params", "parameters"), ("from", "initialised from"),
            ("seeds", "seeds"), ("init", "test loss at init"), ("final", "test loss after fine-tuning"),
            ("delta", "Δ vs Rand (same seed)"), ("steps", "steps to Rand's final loss"),
            ("reached", "seeds that reach it")]
    cols += [(k, "second-domain loss" if k == "second_loss" else k) for k in _summary_scores(summary)]
    return markdown_table(rows, cols)


def _summary_scores(summary: list[dict[str, Any]]) -> list[str]:
    """The extra scores the summary rows carry (see _scores)."""
    keys = [k[:-5] for r in summary for k in r if k.endswith("_mean") and (k.startswith("second_loss") or "." in k)]
    return list(dict.fromkeys(keys))


def teacher_table(run_dir: Path, summary: list[dict[str, Any]], n_targets: int) -> str:
    """Teacher tokens for the whole family of targets: the chain (its first step calls the
    source, later steps their anchors) and recovery (anchors only) against distilling every
    target from the source (Direct KD, Prune + KD), from the chain's manifest and the rows."""
    from cbd_ray.manifest import Manifest
    from cbd_ray.report import markdown_table

    stages = Manifest.load(run_dir / "chain").stages
    steps = {k: int((v.get("metrics") or {}).get("teacher_tokens") or 0) for k, v in stages.items()
             if k.startswith("chain_")}
    first = steps.get("chain_1", 0)
    rows = [{"method": "CBD (the chain, shared by every target)", "source": first, "anchors": sum(steps.values()) - first}]
    by = lambda m, k: sum(int(r.get(f"{k}_mean") or 0) for r in summary if r["method"] == m)  # noqa: E731
    if any(r["method"] == "cbd_recover" for r in summary):
        rows.append({"method": "CBD + recovery", "source": first,
                     "anchors": sum(steps.values()) - first + by("cbd_recover", "anchor_teacher_tokens")})
    for m in ("direct_kd", "prune_kd"):
        if any(r["method"] == m for r in summary):
            rows.append({"method": f"{label_of(m)} (every target from the source)", "source": by(m, "teacher_tokens"),
                         "anchors": 0})
    for r in rows:
        r["total"] = r["source"] + r["anchors"]
    cols = [("method", "method"), ("source", "tokens from the source"), ("anchors", "tokens from anchors"),
            ("total", "teacher tokens in all")]
    return (f"Teacher tokens (measured) to initialise all {n_targets} targets once (per-target figures are means "
            "over the seeds):\n\n" + markdown_table(rows, cols))


def _plots(run_dir: Path, summary: list[dict[str, Any]]) -> list[Path]:
    from cbd_ray.report import plot_curves, plot_scores_by_size

    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    pts = [{"method": r["label"], "params": r["params"], "final_loss": r["final_loss_mean"],
            "initial_loss": r["initial_loss_mean"]} for r in summary]
    images = [plot_scores_by_size(pts, "final_loss", plots / "final_loss_by_size.png",
                                  title="test loss after fine-tuning (mean over seeds), by size"),
              plot_scores_by_size(pts, "initial_loss", plots / "initial_loss_by_size.png",
                                  title="test loss at initialisation (mean over seeds)")]
    curves = {f"{r['target']} {r['label']}": [tuple(p) for p in r["eval_curve_mean"]] for r in summary
              if r["method"] in ("cbd", "rand", "prune", "prune_kd", "cbd_recover")}
    if curves:
        images.append(plot_curves(curves, plots / "loss_curves_cbd_vs_rand.png", xlabel="fine-tuning step",
                                  ylabel="test loss (mean over seeds)", title="CBD vs Prune vs Rand"))
    return images


def write_reproduce_report(run_dir: Path, cfg: ReproduceConfig, chain: list[tuple[str, str]],
                           targets: list[dict[str, Any]], rows: list[dict[str, Any]], best: dict[str, float],
                           command: str | None = None, seconds: float | None = None,
                           summary: list[dict[str, Any]] | None = None) -> Path:
    """``<run>/report.md`` and its plots from the per-seed rows (and their summary)."""
    from cbd_ray.report import Section, write_report

    summary = summary if summary is not None else summarise(rows)
    ft = cfg.finetune
    chain_rows = [(n, _params(Path(d))) for n, d in chain]
    setup = [
        f"- machine: {_machine()}",
        f"- command: `{command}`" if command else "",
        f"- chain: {' > '.join(f'{n} ({p:,})' for n, p in chain_rows)}",
        f"- seeds: {', '.join(map(str, cfg.seeds))} for every method (the seed sets random inits, Direct KD and the "
        "fine-tuning batch order); the tables give mean ± sample std over the seeds",
        f"- splits: the held-out text is cut into a validation part ({ft.val_fraction:.0%}), on which α and chain "
        "density are searched, and a test part, on which every loss below is measured; no search saw the test part",
        f"- downstream budget, the same for every method: {ft.steps} steps x {ft.batch_size} x {ft.seq_len} tokens "
        f"({ft.steps * ft.batch_size * ft.seq_len:,} tokens) on `{ft.data}`, lr {ft.lr}, test loss every "
        f"{ft.eval_every} steps on {ft.eval_windows} fixed windows",
        f"- CBD α: {cfg.alpha}" + (f" (searched on validation: {', '.join(f'{k}={v:g}' for k, v in best.items())})"
                                   if best else ""),
        f"- Prune: the source cut straight to each target by the grid's subset rules; Learngene: {cfg.learngene.genes} "
        "source layers inherited (width-resized to the target)",
        _teacher_line(run_dir, summary),
        f"- wall time: {seconds:.0f} s" if seconds else "",
    ]
    sections: list[Section] = [Section("Setup", "\n".join(x for x in setup if x))]
    sections.append(Section("Results (test loss in nats per token; lower is better)", _table(summary)))
    sections.append(Section("Where CBD wins and where it loses", _verdicts(summary)))
    sections.append(Section("Teacher tokens", teacher_table(run_dir, summary, len(targets))))
    sections.append(Section("Plots", "", _plots(run_dir, summary) if summary else []))
    tune = run_dir / "chain" / "tune"
    if (tune / "alpha_results.md").is_file():
        sections.append(Section("α sweep (validation loss of the interpolated model per α)",
                                (tune / "alpha_results.md").read_text(),
                                [tune / "alpha_sweep.png"] if (tune / "alpha_sweep.png").is_file() else []))
    if (tune / "density.md").is_file():
        sections.append(Section("Chain density (validation loss; anchors interpolated between, α auto)",
                                (tune / "density.md").read_text(),
                                [tune / "density.png"] if (tune / "density.png").is_file() else []))
    return write_report(run_dir, sections, title=f"CBD against its baselines: {cfg.run.name}")


def _teacher_line(run_dir: Path, summary: list[dict[str, Any]]) -> str:
    """Teacher tokens: the whole chain's (shared by every CBD target) against Direct KD's,
    measured for every target it ran on; without Direct KD rows the line says no figure."""
    from cbd_ray.manifest import Manifest

    chain = sum(int(v.get("teacher_tokens") or 0) for v in Manifest.load(run_dir / "chain").stages.values())
    kd = [(r["target"], int(r.get("teacher_tokens_mean") or 0)) for r in summary if r["method"] == "direct_kd"]
    line = f"- teacher tokens (measured): the chain spent {chain:,} in all (shared by every CBD target)"
    if kd:
        line += ("; Direct KD, measured per target (mean over seeds): "
                 + ", ".join(f"{t} {n:,}" for t, n in kd) + f" ({sum(n for _, n in kd):,} for {len(kd)} targets)")
    else:
        line += "; Direct KD was not run, so no figure for it is given"
    return line


def _verdicts(summary: list[dict[str, Any]]) -> str:
    """Plain sentences from the means: for every baseline, on how many targets CBD's final
    test loss is lower (and by more than the two stds), and the targets where it is not."""
    cbd = {r["target"]: r for r in summary if r["method"] == "cbd"}
    if not cbd:
        return "CBD was not run."
    lines = []
    for m in dict.fromkeys(r["method"] for r in summary):
        pairs = [(cbd[r["target"]], r) for r in summary if r["method"] == m and r["target"] in cbd and m != "cbd"]
        if not pairs:
            continue
        wins = [(c, b) for c, b in pairs if c["final_loss_mean"] < b["final_loss_mean"]]
        clear = sum(b["final_loss_mean"] - c["final_loss_mean"] > c["final_loss_std"] + b["final_loss_std"]
                    for c, b in wins)
        line = (f"- vs {label_of(m)}: CBD has the lower mean test loss after fine-tuning on {len(wins)}/{len(pairs)} "
                f"targets ({clear} by more than the two stds)")
        losses = [f"{c['target']} (CBD {_pm(c, 'final_loss')} vs {_pm(b, 'final_loss')})" for c, b in pairs
                  if (c, b) not in wins]
        if losses:
            line += "; **CBD loses** on " + ", ".join(losses)
        init_wins = sum(c["initial_loss_mean"] < b["initial_loss_mean"] for c, b in pairs)
        line += f". At initialisation CBD is lower on {init_wins}/{len(pairs)}."
        lines.append(line)
    lines += _score_verdicts(summary, cbd)
    speed = [f"{r['target']}: {_pm(r, 'steps_to_rand', 1) or 'never'} steps (seeds reaching it: {r['reached']})"
             for r in cbd.values() if "steps_to_rand_mean" in r]
    if speed:
        lines.append("- steps CBD needs to reach Rand's final test loss: " + "; ".join(speed))
    return "\n".join(lines)


def _score_verdicts(summary: list[dict[str, Any]], cbd: dict[str, dict[str, Any]]) -> list[str]:
    """Per extra score (second-domain loss: lower is better; task metrics such as
    ``dolly.rougeL``: higher is better): on how many targets CBD beats each method, and where
    it loses."""
    lines = []
    for k in _summary_scores(summary):
        higher = k != "second_loss" and not k.endswith(("loss", "perplexity", "ppl"))
        for m in dict.fromkeys(r["method"] for r in summary if r["method"] != "cbd"):
            pairs = [(cbd[r["target"]], r) for r in summary if r["method"] == m and r["target"] in cbd
                     and r.get(f"{k}_mean") is not None and cbd[r["target"]].get(f"{k}_mean") is not None]
            if not pairs:
                continue
            better = [(c, b) for c, b in pairs if (c[f"{k}_mean"] > b[f"{k}_mean"]) == higher
                      and c[f"{k}_mean"] != b[f"{k}_mean"]]
            loses = [f"{c['target']} ({_pm(c, k)} vs {_pm(b, k)})" for c, b in pairs if (c, b) not in better]
            lines.append(f"- {k} ({'higher' if higher else 'lower'} is better) vs {label_of(m)}: CBD better on "
                         f"{len(better)}/{len(pairs)} targets" + ("; **CBD loses or ties** on " + ", ".join(loses)
                                                                  if loses else ""))
    return lines


# --------------------------------------------------------------------------- α sweep with and without alignment


def alignment_sweep(pairs: list[dict[str, Any]], text_path: str | os.PathLike, out_dir: str | os.PathLike,
                    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0), windows: int = 32, seq_len: int = 64,
                    resize: dict[str, Any] | None = None, log: Log = print) -> list[dict[str, Any]]:
    """Loss at init of every (pair, target, α) made with ``align`` off and on.

    ``pairs``: [{"name", "small", "large", "targets": [{"name", "shape"}]}]. Each model is
    interpolated (cbd_ray.interpolate.AnchorPair), scored on the same windows of
    ``text_path`` (mean token NLL) and deleted. Returns the rows and writes
    ``alignment_sweep.json``, ``.md`` and ``.png`` into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cbd_ray.finetune import encode_text, eval_windows, heldout_loss
    from cbd_ray.interpolate import AnchorPair, ResizeOptions, Shape
    from cbd_ray.report import markdown_table, plot_curves
    from cbd_ray.storage import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for p in pairs:
        ids = encode_text(AutoTokenizer.from_pretrained(p["large"]), Path(text_path).read_text())
        win = eval_windows(ids, seq_len, windows)
        for mode in ("off", "on"):
            pair = AnchorPair(p["small"], p["large"], resize=ResizeOptions(**(resize or {})), align=mode)
            for t in p["targets"]:
                for a in alphas:
                    d = out / ".scratch" / f"{p['name']}-{t['name']}-{mode}-{a}"
                    rec = pair.make(Shape(**t["shape"]), d, alpha=a, overwrite=True)
                    model = AutoModelForCausalLM.from_pretrained(str(d))
                    loss = heldout_loss(model, win)
                    shutil.rmtree(d, ignore_errors=True)
                    rows.append({"pair": p["name"], "target": t["name"], "align": mode, "alpha": a, "loss": loss,
                                 "aligned": rec.get("aligned", False), "params": rec["params"]})
                    log(f"alignment sweep: {p['name']} {t['name']} align={mode} α={a:.2f}: {loss:.4f}")
    shutil.rmtree(out / ".scratch", ignore_errors=True)
    atomic_write_json(out / "alignment_sweep.json", rows)
    atomic_write_text(out / "alignment_sweep.md", markdown_table(
        rows, [("pair", "anchor pair"), ("target", "target"), ("align", "align"), ("alpha", "α"),
               ("loss", "loss at init")]))
    curves = {f"{r['pair']} {r['target']} align {r['align']}": [(x["alpha"], x["loss"]) for x in rows
              if (x["pair"], x["target"], x["align"]) == (r["pair"], r["target"], r["align"])] for r in rows}
    plot_curves(curves, out / "alignment_sweep.png", xlabel="α (weight of the smaller anchor)",
                ylabel="loss at init (validation)", title="α sweep with and without alignment", markers=True)
    return rows

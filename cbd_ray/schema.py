"""The chain job's config: one YAML file, typed, validated before any work.

    run:        name, storage root (local path or pyarrow.fs URI), seed, lease timeout
    data:       instruction records and plain text (``builtin`` = text that ships with Python)
    source:     the top of the chain: a checkpoint (hub name or directory) or a tiny model
                built from a shape and pretrained here; optional SFT
    bridge:     optional: a teacher of another family/vocabulary answers the prompts and the
                source (the bridge model, of the chain's family) is fine-tuned on the answers
    distill:    distillation settings shared by every chain step (cbd_ray.train.DistillConfig)
    anchors:    the chain below the source, in descending size; each may override ``distill``
                and be SFT'd on the instructions before its step (``sft``)
    grid:       target shapes, α and resize choices, interpolation actors
    evaluation: held-out loss of every target against random initialisation, optional tasks
    scaling:    workers, device (cpu/cuda/npu), DeepSpeed stage, device memory (for the memory plan)

Unknown keys and impossible settings are ConfigErrors naming the key's dotted path and what
is allowed. Validation needs no network: shapes come from the config itself (hub checkpoints
in the shipped configs carry their shape).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from cbd_ray.config import Strict, apply_overrides, build, config_hash, format_validation_error, load_yaml
from cbd_ray.errors import ConfigError

Family = Literal["gpt2", "gpt_neox", "llama", "qwen2", "qwen3"]
Alpha = Union[float, Literal["auto"]]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_GATED = ("llama", "qwen2", "qwen3")  # gated MLP: three FFN matrices


class ShapeSpec(Strict):
    """A transformer's shape. ``ffn`` defaults to 4 × hidden; ``kv_heads`` to ``heads``;
    ``head_dim`` to hidden / heads (Qwen3 sets it apart from hidden)."""

    layers: PositiveInt
    hidden: PositiveInt
    heads: PositiveInt
    kv_heads: PositiveInt | None = None
    ffn: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    vocab_size: PositiveInt | None = None

    @model_validator(mode="after")
    def _divisible(self) -> "ShapeSpec":
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"heads={self.heads} must divide hidden={self.hidden}")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"kv_heads={self.kv_heads} must divide heads={self.heads}")
        return self

    def axes(self) -> dict[str, int]:
        """The structural axes interpolation resizes (ffn and kv_heads filled in)."""
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.kv_heads or self.heads, "ffn": self.ffn or 4 * self.hidden}


def estimate_params(shape: ShapeSpec, family: str, vocab_size: int | None = None) -> int:
    """Approximate parameter count of a decoder of ``family`` with ``shape`` (embeddings
    counted once; biases and norms ignored). Used only to order anchors and targets."""
    a = shape.axes()
    hd = shape.head_dim or a["hidden"] // a["heads"]
    attn = a["hidden"] * hd * (2 * a["heads"] + 2 * a["kv_heads"])
    mlp = (3 if family in _GATED else 2) * a["hidden"] * a["ffn"]
    vocab = vocab_size or shape.vocab_size or 0
    return a["layers"] * (attn + mlp) + vocab * a["hidden"]


class TokenizerSpec(Strict):
    """A byte-level BPE trained here (cbd_ray.tiny.train_bpe_tokenizer) on ``text``."""

    vocab_size: int = Field(default=512, ge=260, le=65536)
    text: Literal["builtin", "instructions"] | str = "builtin"


class PretrainSpec(Strict):
    """Language-model pretraining of a tiny model on plain text (the data section's text)."""

    steps: int = Field(default=200, ge=0)
    batch_size: PositiveInt = 8
    seq_len: PositiveInt = 128
    lr: float = Field(default=1e-3, gt=0, lt=1)
    checkpoint_every: PositiveInt = 50


class TinySpec(Strict):
    """Build a model of ``family`` and ``shape`` from scratch and pretrain it here."""

    family: Family = "gpt2"
    shape: ShapeSpec
    max_positions: PositiveInt = 256
    seed: int = 0
    tokenizer: TokenizerSpec = TokenizerSpec()
    pretrain: PretrainSpec = PretrainSpec()


class SFTSpec(Strict):
    """Supervised fine-tuning on the instruction data before the model teaches
    (the paper SFTs teacher and anchors on Dolly first). Keys override ``distill``."""

    enabled: bool = True
    distill: dict[str, Any] = {}


class ModelSpec(Strict):
    """A model: a checkpoint (``model``: hub name or local directory) or a tiny model built
    here (``tiny``). ``family`` and ``shape`` of a checkpoint let validation run offline."""

    model: str | None = None
    tiny: TinySpec | None = None
    family: Family | None = None
    shape: ShapeSpec | None = None
    sft: SFTSpec | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "ModelSpec":
        if (self.model is None) == (self.tiny is None):
            raise ValueError("give exactly one of `model` (a hub name or directory) or `tiny` (build from a shape)")
        if self.tiny is not None:
            if self.family is not None and self.family != self.tiny.family:
                raise ValueError(f"family={self.family!r} differs from tiny.family={self.tiny.family!r}")
            if self.shape is not None:
                raise ValueError("a tiny model's shape goes in tiny.shape, not shape")
        return self

    @property
    def kind_family(self) -> str | None:
        return self.tiny.family if self.tiny is not None else self.family

    @property
    def kind_shape(self) -> ShapeSpec | None:
        return self.tiny.shape if self.tiny is not None else self.shape

    def vocab(self) -> int | None:
        if self.tiny is not None:
            return self.tiny.tokenizer.vocab_size
        return self.shape.vocab_size if self.shape else None


class GenerationSpec(Strict):
    """Teacher sampling for the bridge (Ray Data map_batches actor pool, one model per actor)."""

    max_new_tokens: PositiveInt = 128
    batch_size: PositiveInt = 8
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    actors: PositiveInt = 1
    gpus_per_actor: float = Field(default=0, ge=0)  # GPUs or NPUs per actor (0: one, on a GPU/NPU cluster)
    cpus_per_actor: float = Field(default=1, gt=0)
    prompts: PositiveInt | None = None  # how many instruction prompts (None: all)


class BridgeSpec(Strict):
    """A heterogeneous teacher answers the prompts; the source (of the chain's family) is
    fine-tuned on the answers (SeqKD) and then teaches the chain."""

    teacher: ModelSpec
    generation: GenerationSpec = GenerationSpec()
    distill: dict[str, Any] = {"objective": "seqkd"}


class AnchorSpec(Strict):
    """One anchor below the source: distilled from its predecessor.

    ``init`` says where the student starts before that distillation:

    ``checkpoint``  ``model`` (a pretrained checkpoint, as in the paper); needs ``model``
    ``prune``       its parent (the previous chain model) cut to ``shape`` by the project's
                    subset rules (cbd_ray.resize, importance on calibration text from the
                    chain's instruction data), so adjacent anchors share channel order
    ``random``      the family's random initialisation at ``shape``
    ``pretrain``    the family's random initialisation at ``shape``, pre-trained from scratch
                    on the data section's text with the source's tokenizer (``pretrain``;
                    default: the tiny source's settings) in a stage of its own,
                    ``<name>_pretrain``: a family trained apart, as the paper's public
                    checkpoints are, made here from the same text

    Default: ``checkpoint`` when ``model`` is given, else ``prune``.

    ``sft``: the paper SFTs the teacher and the anchors on Dolly before distilling (as
    MiniLLM starts its student from an SFT'd checkpoint), so the anchor's starting model (the
    public checkpoint, or its pruned or random start) is fine-tuned on the instructions in a
    stage of its own, ``<name>_sft`` (as ``source.sft`` makes ``source_sft``), and the chain
    step then distils that SFT'd model from its parent. Keys of ``sft.distill`` override the
    shared ``distill`` section, objective ``sft``."""

    name: str
    model: str | None = None
    shape: ShapeSpec | None = None
    init: Literal["checkpoint", "prune", "random", "pretrain"] | None = None
    seed: int = 0
    distill: dict[str, Any] = {}
    sft: SFTSpec | None = None
    pretrain: PretrainSpec | None = None  # init: pretrain only (None: the tiny source's settings)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"name {v!r} must be letters, digits, '.', '_', '+' or '-' (a directory name)")
        return v

    @model_validator(mode="after")
    def _has_start(self) -> "AnchorSpec":
        if self.model is None and self.shape is None:
            raise ValueError("give `model` (a checkpoint to start from) or `shape` (prune or random initialisation)")
        if self.init is None:
            self.init = "checkpoint" if self.model is not None else "prune"
        if self.init == "checkpoint" and self.model is None:
            raise ValueError("init 'checkpoint' needs `model` (a checkpoint); allowed without one: prune, random")
        if self.init != "checkpoint" and self.model is not None:
            raise ValueError(f"init {self.init!r} does not use `model` ({self.model!r}); drop it or use init: checkpoint")
        if self.init != "checkpoint" and self.shape is None:
            raise ValueError(f"init {self.init!r} needs `shape` (the anchor's layers/hidden/heads)")
        if self.pretrain is not None and self.init != "pretrain":
            raise ValueError(f"`pretrain` is used by init: pretrain only (this anchor's init is {self.init!r})")
        return self


class TargetSpec(Strict):
    name: str | None = None
    layers: PositiveInt
    hidden: PositiveInt
    heads: PositiveInt
    kv_heads: PositiveInt | None = None
    ffn: PositiveInt | None = None
    alpha: Alpha | None = None

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v: Alpha | None) -> Alpha | None:
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError(f"alpha={v} must be in [0, 1] or 'auto'")
        return v

    @model_validator(mode="after")
    def _divisible(self) -> "TargetSpec":
        if self.hidden % self.heads:
            raise ValueError(f"heads={self.heads} must divide hidden={self.hidden}")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"kv_heads={self.kv_heads} must divide heads={self.heads}")
        return self

    @property
    def label(self) -> str:
        return self.name or f"{self.layers}x{self.hidden}x{self.heads}"


class ResizeSpec(Strict):
    """Resize choices per axis (cbd_ray.interpolate.ResizeOptions); defaults follow the paper."""

    layer_subset: Literal["uniform", "importance"] | None = None  # None: importance with calib, else uniform
    layer_expand: Literal["replicate", "identity"] = "replicate"
    width_subset: Literal["magnitude", "importance", "first"] | None = None  # None: importance with calib, else magnitude
    width_expand: Literal["zero", "copy"] = "zero"
    calib: bool = False  # importance from calibration activations on the instruction data

    @model_validator(mode="after")
    def _importance_needs_calib(self) -> "ResizeSpec":
        if "importance" in (self.layer_subset, self.width_subset) and not self.calib:
            raise ValueError("importance-based subsetting needs calibration text: set calib: true")
        return self


#: what the grid's α search tries when grid.search_alphas is not given (the endpoints are always added)
SEARCH_ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


class GridSpec(Strict):
    #: a number in [0, 1], "auto" (by parameter count), "best": the α that jobs/tune_alpha.py
    #: wrote to <run>/tune/best_alpha.json ("auto" for targets it did not search), or "search":
    #: the grid stage blends each target at every α of ``search_alphas`` and keeps the one with
    #: the lowest loss on the chain's validation text (data.val_fraction). Unset: "search" when
    #: the chain has validation text, else "auto" (resolved by ChainConfig).
    alpha: Union[float, Literal["auto", "best", "search"], None] = None
    #: α values the search blends at; 0 and 1 (the anchors themselves) are always among them,
    #: so a searched target never starts worse on validation than its own endpoints
    search_alphas: list[float] = Field(default_factory=lambda: list(SEARCH_ALPHAS), min_length=1)
    search_windows: PositiveInt = 8   # validation windows each blend is scored on
    search_seq_len: PositiveInt = 128  # tokens a window (capped by the model's positions)
    resize: ResizeSpec = ResizeSpec()
    actors: PositiveInt = 2
    targets: list[TargetSpec] = Field(min_length=1)
    #: edge formats of every target, written by the `export` stage (cbd_ray.export)
    export: list[Literal["onnx", "gguf"]] = []
    #: a short distillation of each blended target from its larger anchor (never the source),
    #: e.g. {steps: 20}: keys override the shared ``distill`` section (cbd_ray.stages.recover)
    recover: dict[str, Any] | None = None

    @field_validator("alpha")
    @classmethod
    def _alpha_range(cls, v):
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError(f"alpha={v} must be in [0, 1], 'auto', 'best' or 'search'")
        return v

    @field_validator("search_alphas")
    @classmethod
    def _with_endpoints(cls, v: list[float]) -> list[float]:
        """Sorted, without repeats, and always with both endpoints: the search must be able to
        fall back on either anchor as it is."""
        bad = [a for a in v if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"{bad} outside [0, 1]")
        return sorted({float(a) for a in v} | {0.0, 1.0})


class DataSpec(Strict):
    """Where the instruction records and the plain text come from.

    ``builtin``: made from Python's own docs (cbd_ray.tiny), so nothing is downloaded.
    Otherwise a local JSONL/Parquet file (Dolly schema) or a hub dataset name; text is a
    local text file."""

    instructions: str = "builtin"
    eval_instructions: str | None = None  # None: the last eval_fraction of instructions
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)
    limit: PositiveInt | None = None
    text: str = "builtin"
    heldout_fraction: float = Field(default=0.1, gt=0, lt=1)
    #: fraction of the text, cut just before the held-out part, kept as validation text
    #: (text_val.txt): neither trained on nor reported; the grid's α search scores on it.
    #: 0: none (the training text is then everything before the held-out part)
    val_fraction: float = Field(default=0.0, ge=0, lt=1)
    builtin_count: PositiveInt = 400

    @model_validator(mode="after")
    def _room_to_train(self) -> "DataSpec":
        if self.val_fraction + self.heldout_fraction >= 1:
            raise ValueError(f"val_fraction {self.val_fraction} + heldout_fraction {self.heldout_fraction} "
                             "leave no training text")
        return self


class EvaluationSpec(Strict):
    """Held-out loss of every target, anchor and random initialisation of the same shape;
    optional tasks of cbd_ray.tasks (boolq, winogrande, hellaswag, arc_easy, mmlu, dolly, ...)."""

    heldout: bool = True
    heldout_windows: PositiveInt = 16
    max_length: PositiveInt | None = None
    tasks: list[str] = []
    data_dir: str | None = None
    limit: PositiveInt | None = None
    cpus_per_task: float = Field(default=1, gt=0)
    #: baselines made for every target and scored on the same held-out windows (stage
    #: ``baselines``): prune = the source cut to the target's shape, direct_kd = a random
    #: init distilled straight from the source with the first chain step's settings
    baselines: list[Literal["prune", "direct_kd"]] = []


class ScalingSpec(Strict):
    """How each training stage is spread: Ray Train workers, their device, DeepSpeed."""

    workers: PositiveInt = 1
    device: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    deepspeed: Literal[0, 1, 2, 3] | None = None
    cpus_per_worker: float = Field(default=1, gt=0)
    #: worker-group restarts from the last checkpoint when a worker or its node is lost
    max_failures: int = Field(default=2, ge=0)
    #: memory of one device in GiB, for the memory plan (`cbd validate --plan`, micro_batch: auto);
    #: None: asked of the device (CPU: this node's memory shared by its workers)
    device_memory_gib: float | None = Field(default=None, gt=0)


class RunSpec(Strict):
    name: str
    storage: str = "runs"
    seed: int = 0
    #: seconds without a heartbeat before another driver takes the run directory's lease over
    #: (cbd_ray.lease: one driver per run directory)
    lease_timeout_s: float = Field(default=120.0, gt=0)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"name {v!r} must be letters, digits, '.', '_', '+' or '-' (a directory name)")
        return v


class ChainConfig(Strict):
    run: RunSpec
    data: DataSpec = DataSpec()
    source: ModelSpec
    bridge: BridgeSpec | None = None
    distill: dict[str, Any] = {}
    anchors: list[AnchorSpec] = Field(min_length=1)
    grid: GridSpec
    evaluation: EvaluationSpec = EvaluationSpec()
    scaling: ScalingSpec = ScalingSpec()

    # ------------------------------------------------------------------ derived views
    @property
    def family(self) -> str | None:
        return self.source.kind_family

    def chain(self) -> list[tuple[str, ShapeSpec | None]]:
        """(name, shape) of every model of the chain, source first."""
        return [("source", self.source.kind_shape)] + [(a.name, a.shape) for a in self.anchors]

    def step_distill(self, i: int) -> dict[str, Any]:
        """The distillation settings of chain step ``i`` (0-based): scaling, then the shared
        defaults, then the anchor's own overrides."""
        return {**self.scaling_distill(), **self.distill, **self.anchors[i].distill}

    def anchor_pretrain(self, anchor: AnchorSpec) -> PretrainSpec:
        """The pretraining settings of an ``init: pretrain`` anchor: its own ``pretrain``, else
        the tiny source's, else PretrainSpec's defaults."""
        if anchor.pretrain is not None:
            return anchor.pretrain
        return self.source.tiny.pretrain if self.source.tiny is not None else PretrainSpec()

    def scaling_distill(self) -> dict[str, Any]:
        s = self.scaling
        out: dict[str, Any] = {"workers": s.workers, "device": s.device, "cpus_per_worker": s.cpus_per_worker}
        if s.deepspeed is not None:
            out["deepspeed"] = s.deepspeed
        if s.device_memory_gib is not None:  # only when set: stage hashes of configs without it stay
            out["device_memory_gib"] = s.device_memory_gib
        return out

    def hash(self) -> str:
        return config_hash(self.model_dump(mode="json"))

    @model_validator(mode="after")
    def _default_alpha(self) -> "ChainConfig":
        """An unset grid.alpha becomes "search" when the chain keeps validation text to score
        blends on, else "auto"; a value written in the config always wins."""
        if self.grid.alpha is None:
            self.grid.alpha = "search" if self.data.val_fraction > 0 else "auto"
        return self


# ---------------------------------------------------------------------- cross-field checks


def _params(shape: ShapeSpec | None, family: str | None, vocab: int | None) -> int | None:
    return None if shape is None or family is None else estimate_params(shape, family, vocab)


def _bracket(lo: dict[str, int], hi: dict[str, int], t: dict[str, int]) -> list[str]:
    """Axes on which ``t`` lies outside [min, max] of the two anchors."""
    return [k for k in t if not min(lo[k], hi[k]) <= t[k] <= max(lo[k], hi[k])]


def with_chain_text(settings: dict[str, Any], text: str) -> dict[str, Any]:
    """Distillation settings outside a chain step (a baseline, recovery): ``lm_data: text``,
    the chain's own training text, becomes ``text`` (its path or URI)."""
    return {**settings, "lm_data": text} if settings.get("lm_data") == "text" else settings


def target_pair(cfg: ChainConfig, target: TargetSpec) -> tuple[int, int] | None:
    """Indices (large, small) into ``cfg.chain()`` of the adjacent pair whose shapes bracket
    ``target`` on every axis (the smallest such pair), or None."""
    chain = cfg.chain()
    t = {"layers": target.layers, "hidden": target.hidden, "heads": target.heads}
    if target.kv_heads is not None:
        t["kv_heads"] = target.kv_heads
    if target.ffn is not None:
        t["ffn"] = target.ffn
    best = None
    for k in range(len(chain) - 1):
        a, b = chain[k][1], chain[k + 1][1]
        if a is None or b is None:
            continue
        if not _bracket(a.axes(), b.axes(), t):
            best = (k, k + 1)  # later pairs are smaller: keep the last that brackets
    return best


def check_semantics(cfg: ChainConfig) -> list[str]:
    """Impossible settings a per-field validator cannot see; each message starts with the
    key's dotted path."""
    problems: list[str] = []
    if cfg.grid.alpha == "search" and not cfg.data.val_fraction:
        problems.append("grid.alpha: search scores each blend on the chain's validation text; "
                        "set data.val_fraction > 0 (or use alpha: auto)")
    names = [a.name for a in cfg.anchors]
    for i, n in enumerate(names):
        if n in ("source", "teacher") or n in names[:i]:
            problems.append(f"anchors.{i}.name: {n!r} is used twice or reserved (source, teacher)")
    family = cfg.family
    if cfg.source.model is not None and cfg.source.family is None:
        problems.append("source.family: required for a checkpoint source (one of gpt2, gpt_neox, llama, qwen2, qwen3)")
    vocab = cfg.source.vocab()
    if cfg.bridge is not None:
        t = cfg.bridge.teacher
        if t.model is not None and t.family is None:
            problems.append("bridge.teacher.family: required for a checkpoint teacher")
        t_vocab = t.vocab()
        if (t.kind_family == family and t_vocab is not None and vocab is not None and t_vocab == vocab
                and t.tiny is None):
            problems.append("bridge.teacher: has the chain's family and vocabulary; distil it directly "
                            "(make it the source) instead of bridging")
        obj = cfg.bridge.distill.get("objective", "seqkd")
        if obj != "seqkd":
            problems.append(f"bridge.distill.objective: the bridge trains on teacher answers and must be "
                            f"'seqkd', got {obj!r}")
    # anchors strictly descending in size
    chain = cfg.chain()
    prev_name, prev_p = "source", _params(chain[0][1], family, vocab)
    for i, a in enumerate(cfg.anchors):
        p = _params(a.shape, family, vocab)
        if p is not None and prev_p is not None and p >= prev_p:
            problems.append(
                f"anchors.{i}: {a.name!r} (~{p:,} parameters) is not smaller than {prev_name!r} "
                f"(~{prev_p:,}); anchors go in descending size")
        if p is not None:
            prev_name, prev_p = a.name, p
    # targets: names unique and each bracketed by an adjacent pair of the chain
    seen: dict[str, int] = {}
    for j, t in enumerate(cfg.grid.targets):
        where = f"grid.targets.{j}"
        if t.name is not None and not _NAME.match(t.name):
            problems.append(f"{where}.name: {t.name!r} must be a directory name (letters, digits, '.', '_', '+', '-')")
        if t.label in seen:
            problems.append(f"{where}.name: {t.label!r} repeats grid.targets.{seen[t.label]}")
        seen.setdefault(t.label, j)
        if not all(s is not None for _, s in chain):
            continue
        pair = target_pair(cfg, t)
        if pair is None:
            pairs = ", ".join(f"{chain[k][0]} {_shape_label(chain[k][1])} > {chain[k + 1][0]} "
                              f"{_shape_label(chain[k + 1][1])}" for k in range(len(chain) - 1))
            problems.append(f"{where}: {t.label} ({t.layers}x{t.hidden}x{t.heads}) lies outside every adjacent "
                            f"anchor pair on some axis; the pairs are: {pairs}")
            continue
        (na, a), (nb, b) = chain[pair[0]], chain[pair[1]]
        hd_a, hd_b = _head_dim(a), _head_dim(b)
        if hd_a != hd_b:
            problems.append(f"{where}: {t.label} lies between {na!r} and {nb!r}, whose head_dim differ ({hd_a} vs "
                            f"{hd_b}); interpolation keeps head_dim fixed, so no target can lie between them")
        elif a.head_dim is None and t.hidden != t.heads * hd_a:
            problems.append(f"{where}: heads={t.heads} x head_dim {hd_a} (of {na!r} and {nb!r}) is not "
                            f"hidden={t.hidden}" + (f"; use heads={t.hidden // hd_a}" if t.hidden % hd_a == 0 else ""))
    # distillation settings of every step, checked against the engine's own config
    problems += _check_distill(cfg)
    if cfg.evaluation.tasks:
        problems += _check_tasks(cfg.evaluation.tasks)
    return problems


def _head_dim(s: ShapeSpec) -> int:
    return s.head_dim or s.hidden // s.heads


def _shape_label(s: ShapeSpec | None) -> str:
    return "?" if s is None else f"{s.layers}x{s.hidden}x{s.heads}"


def _check_distill(cfg: ChainConfig) -> list[str]:
    """Validate every step's merged settings with the engine's DistillConfig; an error is
    reported at the key where the bad value was written (the anchor's override, else the
    shared ``distill`` section, else ``scaling``)."""
    from cbd_ray.train import DistillConfig  # the engine's settings, imported only when checked

    jobs: list[tuple[str, dict, dict]] = []
    for i, a in enumerate(cfg.anchors):
        jobs.append((f"anchors.{i}.distill", a.distill, cfg.step_distill(i)))
        if a.sft is not None:
            jobs.append((f"anchors.{i}.sft.distill", a.sft.distill,
                         {**cfg.scaling_distill(), **cfg.distill, "objective": "sft", **a.sft.distill}))
    if cfg.grid.recover is not None:
        jobs.append(("grid.recover", cfg.grid.recover, {**cfg.scaling_distill(), **cfg.distill, **cfg.grid.recover}))
    if cfg.source.sft is not None:
        jobs.append(("source.sft.distill", cfg.source.sft.distill,
                     {**cfg.scaling_distill(), **cfg.distill, "objective": "sft", **cfg.source.sft.distill}))
    if cfg.bridge is not None:
        jobs.append(("bridge.distill", cfg.bridge.distill,
                     {**cfg.scaling_distill(), **cfg.distill, "objective": "seqkd", **cfg.bridge.distill}))
        tsft = cfg.bridge.teacher.sft
        if tsft is not None:
            jobs.append(("bridge.teacher.sft.distill", tsft.distill,
                         {**cfg.scaling_distill(), **cfg.distill, "objective": "sft", **tsft.distill}))
    out: list[str] = []
    seen: set[str] = set()
    for where, own, merged in jobs:
        try:
            DistillConfig.model_validate(merged)
        except ValidationError as exc:
            for err in exc.errors():
                key = str(err["loc"][0]) if err["loc"] else ""
                if not key:  # a whole-config rule: blame the first setting its message names
                    hits = [(m.start(), k) for k in merged if (m := re.search(rf"\b{re.escape(k)}\b", err["msg"]))]
                    key = min(hits)[1] if hits else ""
                if key in own:
                    path = f"{where}.{key}"
                elif key in cfg.distill:
                    path = f"distill.{key}"
                elif key in cfg.scaling_distill():
                    path = f"scaling.{key}"
                else:
                    path = f"{where}.{key}" if key else where
                rest = ".".join(str(p) for p in err["loc"][1:]) if err["loc"] else ""
                msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                if err["type"] in ("literal_error", "enum"):
                    msg = f"{msg} (got {err.get('input')!r})"
                line = f"{path}{'.' + rest if rest else ''}: {msg}"
                if line not in seen:
                    seen.add(line)
                    out.append(line)
    return out


def _check_tasks(tasks: list[str]) -> list[str]:
    from cbd_ray.tasks import parse_task

    out = []
    for i, t in enumerate(tasks):
        if t == "heldout":
            continue
        try:
            parse_task(t)
        except ValueError as exc:
            out.append(f"evaluation.tasks.{i}: {exc}")
    return out


# ---------------------------------------------------------------------- loading


def parse_config(data: dict, source: str = "config") -> ChainConfig:
    """Validate a mapping into a ChainConfig; one ConfigError listing every problem."""
    cfg = build(ChainConfig, data, source=source)
    problems = check_semantics(cfg)
    if problems:
        raise ConfigError(f"{source} is invalid:\n  " + "\n  ".join(problems))
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ChainConfig:
    """Read a chain config YAML, apply dotted overrides (``key.sub=value``), validate."""
    data = apply_overrides(load_yaml(path), overrides)
    return parse_config(data, source=str(path))


__all__ = [
    "ChainConfig", "ModelSpec", "TinySpec", "AnchorSpec", "TargetSpec", "GridSpec", "ShapeSpec",
    "BridgeSpec", "DataSpec", "EvaluationSpec", "ScalingSpec", "load_config", "parse_config",
    "check_semantics", "estimate_params", "target_pair", "format_validation_error",
]

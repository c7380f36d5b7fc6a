"""One chain step: a distillation run, as a plain per-worker loop wrapped by Ray Train.

``train_loop_per_worker(config)`` is ordinary torch: it runs alone (world size 1, no Ray)
or as each worker of a ``ray.train.torch.TorchTrainer``. Everything it needs travels in its
``config`` dict (never module globals). The student is trained in float32 master weights
(bf16 autocast on accelerators), wrapped by ``ray.train.torch.prepare_model`` (DDP) or by
DeepSpeed when ``deepspeed`` is set; the teacher is frozen (eval mode, no gradients, bf16 on
accelerators) and never wrapped. With ``dropout_off`` (MiniLLM's default) the student trains
in eval mode too (:func:`set_student_mode`). The run ends at ``steps`` or, with
``max_prompt_epochs``, once the steps have covered that many epochs of the training records
(:func:`planned_steps`); that last step is always evaluated and checkpointed.

The global batch is independent of the worker count: each step takes the same ``batch_size``
records (a seeded permutation per epoch), each worker its contiguous slice, in micro-batches
with gradient accumulation. Micro-batch losses are weighted by their share of the global
batch's counted tokens (rows, for objectives that sample), so 1 and 2 workers compute the
same step.

``run_distill`` is the driver: it validates everything cheap first (paths, vocabularies,
cluster resources), tokenises the data with Ray Data, fits the trainer (checkpoints every N
steps through ``ray.train.report``; ``FailureConfig`` restarts from the last one) and writes
the chosen checkpoint (last, or best by a validation metric) as a Hugging Face directory
with the tokenizer beside it, atomically.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from cbd_ray.cards import fit_tokenizer, write_distilled_card
from cbd_ray.config import Strict, config_hash
from cbd_ray.errors import CBDError, CheckpointError, ConfigError
from cbd_ray.session import connect_ray, shorten_train_shutdown
from cbd_ray.storage import driver_path, is_remote, ref_label, uri_join, worker_ref

logger = logging.getLogger(__name__)

Objective = Literal["sft", "kd", "on_policy", "seqkd", "minillm"]
Divergence = Literal["fkl", "rkl", "jsd", "sfkl", "srkl"]


#: ``data_actors: auto`` tokenises up to this many training records in the driver (Dolly's 15k
#: included): one Ray Data actor took 4.3 s for 44 records and 15.6 s for 15,011, the driver
#: 0.5 s and 6.0 s, for the same table (bench/tokenise_paths.py, 2 CPUs; docs/benchmarks.md).
#: The driver holds the records already; their tokens at 512 a row add ~4 MB a thousand.
DRIVER_TOKENISE_RECORDS = 20_000

#: MiniLLM as its authors run it (github microsoft/LMOps ``minillm``: ``train_minillm.py``,
#: ``minillm/trainer.py``, ``arguments.py``, recipe ``scripts/gpt2/minillm/train_base_xl.sh``;
#: the paper's appendix B for the checkpoint choice). With ``objective: minillm`` these are the
#: defaults of the settings a config leaves out; a setting written out (``null`` included) wins.
MINILLM_RECIPE: dict[str, Any] = {
    "dropout_off": True,          # the reference scores rollouts and trains its policy in eval mode
    "schedule": "constant",       # --scheduler-name constant_trm: constant after the warm-up
    "warmup": 100,                # --warmup-iters 100
    "weight_decay": 1e-6,         # --weight-decay 1e-6
    "max_prompt_epochs": 10.0,    # --epochs 10 beside --total-iters 5000: whichever comes first
    "max_prompt_len": 256,        # --max-prompt-length 256: longer prompts are dropped
    "select_best_by": "rougeL",   # the paper: the best checkpoint by Rouge-L on validation
}


class DistillConfig(Strict):
    """Settings of one distillation run. Defaults follow the paper (temperature 1, length
    512, clip 0.2, teacher mix 0.2, 4 inner epochs) and, for MiniLLM's settings the paper does
    not give (γ, reward scale and clip, whitening, the pretraining term), the LMOps reference.
    With ``objective: minillm`` the settings of :data:`MINILLM_RECIPE` a config leaves out take
    the authors' values (no dropout, constant rate after 100 warm-up steps, weight decay 1e-6,
    at most 10 epochs over the prompts, prompts over 256 tokens dropped, best checkpoint by
    Rouge-L); every other objective keeps the field defaults below."""

    objective: Objective = "kd"
    divergence: Divergence = "rkl"
    steps: PositiveInt = 100
    batch_size: PositiveInt = 8            # global: records per optimiser step over all workers
    # records per forward on one worker; None = all of its share; "auto": the largest that the
    # memory plan fits on the device (cbd_ray.memplan), resolved by run_distill before any work
    micro_batch: PositiveInt | Literal["auto"] | None = None
    gradient_checkpointing: bool = False    # the student recomputes each block's activations in backward
    max_len: PositiveInt = 512
    on_overflow: Literal["truncate", "error"] = "truncate"
    data_limit: PositiveInt | None = None
    eval_limit: PositiveInt | None = 64
    lr: float = Field(default=1e-5, gt=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)   # minillm: 1e-6 (MINILLM_RECIPE)
    warmup: int = Field(default=0, ge=0)   # steps of linear warm-up; minillm: 100
    schedule: Literal["cosine", "constant"] = "cosine"  # minillm: constant
    # the student runs in eval mode (no dropout) through every step: sampling, scoring and the
    # gradient step see the same network (gradient checkpointing still applies); minillm: on
    dropout_off: bool = False
    # stop once the batches taken (MiniLLM: its rollouts, one per ppo_epochs steps) × batch_size
    # reach this many epochs over the training records, or at `steps` if that comes first
    # (planned_steps); None: `steps` alone; minillm: 10
    max_prompt_epochs: float | None = Field(default=None, gt=0)
    # training records whose prompt is longer (tokens, template included) are dropped and
    # counted, not cut; None: kept (cut to fit max_len); minillm: 256
    max_prompt_len: PositiveInt | None = None
    grad_clip: float | None = Field(default=1.0, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    jsd_beta: float = Field(default=0.5, ge=0, le=1)
    skew_alpha: float = Field(default=0.1, ge=0, le=1)
    chunk_size: PositiveInt | None = None   # vocabulary rows projected at a time; None: from kd_chunk_bytes
    kd_chunk_bytes: PositiveInt = 128 * 2**20  # budget for one chunk's float32 [rows, V] buffers
    # sampling (on_policy, seqkd from the teacher, minillm)
    on_policy_fraction: float = Field(default=0.5, ge=0, le=1)  # GKD's λ
    seqkd_source: Literal["teacher", "data"] = "data"
    max_new_tokens: PositiveInt = 256
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    # MiniLLM
    teacher_mix: float = Field(default=0.2, ge=0, le=1)
    ppo_epochs: PositiveInt = 4
    clip: float = Field(default=0.2, gt=0)
    gamma: float = Field(default=0.95, ge=0, le=1)   # reference (LMOps minillm) --gamma
    single_step: bool = True
    reward_scaling: float = Field(default=0.5, gt=0)  # rewards are divided by it (recipe 0.5)
    reward_clip: float | None = Field(default=100.0, gt=0)  # |reward| cap (recipe 100; None: off)
    whiten: bool = True                     # whiten advantages (reference: always)
    lm_coef: float | None = Field(default=None, ge=0)  # pretraining term; None: 1 (reference) when lm_data is given
    kd_ratio: float = Field(default=0.5, ge=0, le=1)  # its mix: (1-r)·CE + r·forward KD
    lm_data: str | None = None              # plain text (.txt, or .jsonl with "text") for the LM loss; in a chain, "text": its own training text
    # bookkeeping
    checkpoint_every: PositiveInt = 100
    keep_checkpoints: PositiveInt | None = 3  # the newest (and best) kept; None: every one
    eval_every: PositiveInt | None = None   # None: at every checkpoint
    log_every: int | None = Field(default=None, ge=0)  # None: log_interval; 0: silent
    select_best_by: Literal["last", "loss", "ce", "rougeL"] = "loss"  # minillm: rougeL
    rouge_samples: PositiveInt = 32
    # scaling
    workers: PositiveInt = 1
    cpus_per_worker: float = Field(default=1, gt=0)
    # Ray Data tokenizer actors for the training records (and MiniLLM's corpus); "auto": the
    # records are tokenised in the driver when there are at most DRIVER_TOKENISE_RECORDS, else
    # by one actor (a corpus: always by actors)
    data_actors: PositiveInt | Literal["auto"] = "auto"
    device: Literal["auto", "cuda", "npu", "cpu"] = "auto"
    deepspeed: Literal[0, 1, 2, 3] | None = None
    device_memory_gib: float | None = Field(default=None, gt=0)  # one device's memory, for the plan; None: ask it
    seed: int = 0
    fail_at_step: PositiveInt | None = None  # test hook: the first attempt crashes once this many steps are done

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data: Any) -> Any:
        """MiniLLM's settings left out of the config take the authors' values (MINILLM_RECIPE)."""
        if isinstance(data, dict) and data.get("objective") == "minillm":
            return {**MINILLM_RECIPE, **data}
        return data

    @model_validator(mode="after")
    def _batches(self) -> "DistillConfig":
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of workers {self.workers} "
                             "(each worker takes an equal share of the global batch)")
        share = self.batch_size // self.workers
        # a micro-batch is an upper bound: one at least as large as the share forwards it whole
        # (so a config keeps working when more workers make each share smaller)
        if isinstance(self.micro_batch, int) and self.micro_batch < share and share % self.micro_batch:
            raise ValueError(f"micro_batch {self.micro_batch} must divide each worker's share {share} "
                             f"(batch_size {self.batch_size} / workers {self.workers})")
        if self.deepspeed == 3:
            # ZeRO-3 gathers parameters only inside the engine's forward; the losses project
            # hidden states through the LM head outside it (to avoid B×T×V logits)
            raise ValueError("deepspeed stage 3 is not supported (the chunked losses apply the LM head outside "
                             "the engine's forward); use stage 1 or 2, which shard optimiser state and gradients")
        if self.objective == "minillm" and self.lm_coef and not self.lm_data:
            raise ValueError(f"lm_coef {self.lm_coef} needs lm_data (plain text for the pretraining term); "
                             "give lm_data or set lm_coef 0")
        return self

    @property
    def per_worker(self) -> int:
        return self.batch_size // self.workers

    @property
    def actors(self) -> int:
        """How many Ray Data tokenizer actors, when the work goes to actors ("auto": one)."""
        return 1 if self.data_actors == "auto" else self.data_actors

    @property
    def micro(self) -> int:
        if self.micro_batch == "auto":
            raise ConfigError("micro_batch 'auto' is not resolved yet: run_distill resolves it from the memory "
                              "plan before any work (DistillConfig.resolved, cbd_ray.memplan)")
        return min(self.micro_batch, self.per_worker) if self.micro_batch else self.per_worker

    def resolved(self, teacher: Any, student: Any, stage: str = "distill", pretraining: bool | None = None,
                 log: Any = None) -> "DistillConfig":
        """This config with ``micro_batch: auto`` replaced by the largest micro-batch whose
        memory plan fits one device (:func:`cbd_ray.memplan.resolve_micro_batch`; ``teacher``
        and ``student`` are model directories or configs); unchanged otherwise."""
        from cbd_ray.memplan import resolve_micro_batch

        return resolve_micro_batch(self, teacher, student, stage, pretraining, log)

    @property
    def log_interval(self) -> int:
        """Steps between progress lines: ``log_every``, else (None) every step with -v and
        a fifth of the run on a quiet console (cbd_ray.console); evaluations always show."""
        if self.log_every is not None:
            return self.log_every
        from cbd_ray.console import verbose

        return 1 if verbose() else max(1, self.steps // 5)

    @property
    def accumulation(self) -> int:
        return self.per_worker // self.micro

    @property
    def needs_teacher(self) -> bool:
        return self.objective in ("kd", "on_policy", "minillm") or (
            self.objective == "seqkd" and self.seqkd_source == "teacher")

    @property
    def needs_responses(self) -> bool:
        """Whether the training records must have responses (prompt-only data suffices for
        objectives that sample their responses)."""
        return self.objective in ("sft", "kd") or (self.objective == "on_policy" and self.on_policy_fraction < 1) or (self.objective == "seqkd" and self.seqkd_source == "data")

    @property
    def best_metric(self) -> tuple[str, str] | None:
        """(metric name, "min"|"max") used to choose the best checkpoint."""
        if self.select_best_by == "last":
            return None
        return (f"eval_{self.select_best_by}", "max" if self.select_best_by == "rougeL" else "min")


# ------------------------------------------------------------------------------- helpers


def lr_factor(step: int, cfg: DistillConfig, total: int | None = None) -> float:
    """Multiplier of ``cfg.lr`` at optimiser step ``step`` (0-based): linear warm-up, then
    cosine decay to ``min_lr_ratio`` over ``total`` steps (default ``cfg.steps``; the run's
    last step when ``max_prompt_epochs`` ends it sooner, :func:`planned_steps`) or constant."""
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, (total or cfg.steps) - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def steps_per_batch(cfg: DistillConfig) -> int:
    """Optimiser steps that train on one batch of records: MiniLLM's rollout serves its
    ``ppo_epochs`` steps; every other objective takes a new batch each step."""
    return cfg.ppo_epochs if cfg.objective == "minillm" else 1


def planned_steps(cfg: DistillConfig, n_records: int) -> tuple[int, str]:
    """(the last optimiser step, what ends the run there): ``cfg.steps``, or sooner the step
    that finishes the batch with which the batches taken × ``batch_size`` reach
    ``max_prompt_epochs`` × ``n_records`` (LMOps stops at ``total_iters`` or after its epochs
    over the prompts, whichever comes first; MiniLLM's last rollout keeps its PPO epochs)."""
    if cfg.max_prompt_epochs is None:
        return cfg.steps, "steps"
    # rounded first, so 0.1 × 30 / 3 is the 1 it means, not 1.0000000000000002 (2 batches)
    batches = max(1, math.ceil(round(cfg.max_prompt_epochs * n_records / cfg.batch_size, 9)))
    cap = batches * steps_per_batch(cfg)
    return (cap, "max_prompt_epochs") if cap < cfg.steps else (cfg.steps, "steps")


def set_student_mode(model: Any, dropout_off: bool) -> None:
    """Train mode, or with ``dropout_off`` eval mode: no dropout anywhere, as LMOps runs its
    policy. transformers checkpoints a layer's activations only while that layer is in
    training mode, so with gradient checkpointing on, the checkpointed layers alone keep the
    training flag (their dropout lives in submodules, which stay in eval mode)."""
    model.train(not dropout_off)
    if not dropout_off:
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
            m.training = True


def global_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The record indices of optimiser step ``step``: consecutive slices of a seeded
    permutation per epoch, the same whatever the worker count."""
    import torch

    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset:offset + take])
        pos += take
    return out


def _all_reduce(t: Any, world: int) -> Any:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def _load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _load_model(model_dir: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    # safetensors only; remote code stays off
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True, trust_remote_code=False)


def _rows(config: dict[str, Any], key: str, tokenizer: Any, cfg: DistillConfig,
          with_response: bool) -> tuple[list[dict], int | None]:
    """(encoded rows, training records dropped for a prompt over ``max_prompt_len``) of the
    train (``key="data"``) or eval data: from the Ray Data shard when the driver passed one
    (the driver counted the dropped: None here), else tokenised here."""
    from cbd_ray.data import encode_records, read_instructions, rows_from_arrays

    if config.get("ray_data", {}).get(key):
        import ray.train

        name = f"data_{ray.train.get_context().get_world_rank()}" if key == "data" else key
        shard = ray.train.get_dataset_shard(name)
        rows: list[dict] = []
        order: list[int] = []
        for b in shard.iter_batches(batch_size=256, batch_format="numpy"):
            rows.extend(rows_from_arrays(b))
            order.extend(int(i) for i in b["idx"])
        # a worker reads only its shard (ShardedData below); sort so the order does not
        # depend on how the blocks arrived
        return [r for _, r in sorted(zip(order, rows), key=lambda x: x[0])], None
    path = config.get(key)
    if not path:
        return [], 0
    from cbd_ray.storage import materialize

    path = str(materialize(path))
    limit = cfg.data_limit if key == "data" else cfg.eval_limit
    records = read_instructions(path, limit, require_response=with_response)
    rows = encode_records(tokenizer, records, cfg.max_len, cfg.on_overflow, with_response,
                          max_prompt_len=cfg.max_prompt_len if key == "data" else None)
    return rows, len(records) - len(rows)


class _Log:
    def __init__(self, rank: int, every: int) -> None:
        self.rank, self.every = rank, every

    def __call__(self, msg: str) -> None:
        if self.rank == 0 and self.every:
            # a Ray worker's stdout is Ray's channel to the driver's console (logging in a
            # worker has no handler); rank 0 only, so a line appears once
            print(f"[distill] {msg}", flush=True)


# ------------------------------------------------------------------------------- the loop


@dataclass
class _Worker:
    """Everything one worker's loop holds: who it is, its models and wrappers, its data."""

    cfg: DistillConfig
    config: dict[str, Any]
    rank: int
    world: int
    device: Any
    in_ray: bool
    log: _Log
    autocast_dtype: Any = None
    tokenizer: Any = None
    student: Any = None          # the Hugging Face module (unwrapped)
    teacher: Any = None
    vocab: int | None = None
    pad: int = 0
    eos: list[int] = dataclass_field(default_factory=list)
    model: Any = None            # the student as trained: DDP, DeepSpeed engine or plain
    engine: Any = None
    optimizer: Any = None
    scheduler: Any = None
    params: list = dataclass_field(default_factory=list)
    rows: list = dataclass_field(default_factory=list)
    sharded: bool = False
    eval_rows: list = dataclass_field(default_factory=list)
    lm: Any = None               # a corpus.TokenStream of pretraining blocks, or None
    #: step, loss and held-out metrics of every checkpoint so far (Ray Train keeps only
    #: ``keep_checkpoints`` of them; the report shows them all)
    ckpt_log: list = dataclass_field(default_factory=list)
    first_step_unix: float | None = None
    last_step: int = 0           # the run's last optimiser step (planned_steps)
    stopped_by: str = "steps"    # what ends the run there: "steps" or "max_prompt_epochs"
    dropped_prompts: int | None = None  # counted here when run alone (on Ray the driver counts)

    @property
    def backwards_per_micro(self) -> int:
        """Backward passes per micro-batch: MiniLLM with pretraining text back-propagates its
        policy term before it builds the pretraining graph, so the two graphs are never
        alive together (objectives.MiniLLM); every other objective does one."""
        return 2 if (self.lm is not None and self.cfg.objective == "minillm") else 1


def _identify(config: dict[str, Any], cfg: DistillConfig) -> _Worker:
    """Rank, world size and device: on a Ray Train worker, resolved here (the driver may have
    no accelerator at all); alone, world size 1 on the configured device."""
    import torch

    from cbd_ray import devices

    if config.get("ray"):
        import ray.train

        tctx = ray.train.get_context()
        rank, world = tctx.get_world_rank(), tctx.get_world_size()
        device = devices.worker_device(config.get("device_kind") or "cpu")
        if rank == 0 and config.get("starts") is not None:
            _count_start(config["starts"])
    else:
        rank, world = 0, 1
        device = devices.resolve(cfg.device).torch_device()
    w = _Worker(cfg=cfg, config=config, rank=rank, world=world, device=device, in_ray=bool(config.get("ray")),
                log=_Log(rank, cfg.log_interval))
    w.autocast_dtype = torch.bfloat16 if device.type != "cpu" else None
    return w


def _load_models(w: _Worker) -> None:
    """Student (float32 master weights), frozen teacher (bf16 on accelerators), tokenizer."""
    import torch

    from cbd_ray.data import check_vocab, pad_id
    from cbd_ray.generate import stop_ids
    from cbd_ray.storage import materialize

    cfg, accel = w.cfg, w.device.type != "cpu"
    student_dir = str(materialize(w.config["student_dir"]))  # a reference: fetched into this node's cache
    w.tokenizer = _load_tokenizer(student_dir)
    w.student = _load_model(student_dir, torch.float32)
    if cfg.gradient_checkpointing:
        # recompute each block's activations in backward: memory per layer falls to its input
        w.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.needs_teacher:
        w.teacher = _load_model(str(materialize(w.config["teacher_dir"])), torch.bfloat16 if accel else torch.float32)
        w.teacher.eval().requires_grad_(False)  # frozen, never wrapped for gradients
        w.teacher.to(w.device)
    w.vocab = w.config.get("vocab")
    if w.vocab is None and w.teacher is not None:
        w.vocab = check_vocab(w.teacher.config, w.student.config)
    w.pad, w.eos = pad_id(w.tokenizer), stop_ids(w.student, w.tokenizer)


def _load_data(w: _Worker) -> None:
    """The worker's training rows (its Ray Data shard, or all records alone), its share of the
    held-out rows, and its stream of pretraining blocks (MiniLLM's LM term); the run's last
    step (:func:`planned_steps` over every worker's records)."""
    cfg = w.cfg
    w.rows, w.dropped_prompts = _rows(w.config, "data", w.tokenizer, cfg, cfg.needs_responses)
    w.sharded = bool(w.config.get("ray_data", {}).get("data")) and w.world > 1  # rows are this worker's shard
    if not w.rows:
        raise CBDError("the training data is empty" + (
            f" (every prompt is over max_prompt_len={cfg.max_prompt_len} tokens)" if w.dropped_prompts else ""))
    if w.dropped_prompts:
        w.log(f"dropped {w.dropped_prompts} of {w.dropped_prompts + len(w.rows)} records whose prompt is over "
              f"max_prompt_len={cfg.max_prompt_len} tokens")
    n_records = len(w.rows) * (w.world if w.sharded else 1)  # the shards are of equal size
    w.last_step, w.stopped_by = planned_steps(cfg, n_records)
    if w.stopped_by != "steps":
        w.log(f"stopping after step {w.last_step} of {cfg.steps}: max_prompt_epochs={cfg.max_prompt_epochs:g} "
              f"over {n_records} training records at {cfg.batch_size} a step")
    w.eval_rows = _rows(w.config, "eval_data", w.tokenizer, cfg, True)[0][w.rank::w.world]
    if not uses_lm_text(cfg):
        return
    ref = w.config.get("lm_corpus")
    if ref is None and (w.config.get("lm_data") or cfg.lm_data):
        ref = _local_corpus(w)
    if ref is not None:
        from cbd_ray.corpus import TokenStream

        if int(ref["index"]["block_len"]) != cfg.max_len:
            raise CBDError(f"the text corpus has blocks of {ref['index']['block_len']} tokens, not max_len {cfg.max_len}")
        w.lm = TokenStream(ref, w.rank, w.world, seed=cfg.seed)


def _local_corpus(w: _Worker) -> dict[str, Any]:
    """The loop run alone (no Ray) with ``lm_data`` a path: tokenised in this process into
    the run directory's ``corpora`` (or a temporary folder), streamed like on Ray."""
    from cbd_ray.corpus import build_corpus
    from cbd_ray.storage import materialize

    root = Path(w.config["run_dir"]) / "corpora" if w.config.get("run_dir") else Path(tempfile.mkdtemp(prefix="cbd_corpus_"))
    src = w.config.get("lm_data") or w.cfg.lm_data
    return build_corpus(str(materialize(src)), materialize(w.config["student_dir"]), w.cfg.max_len, str(root),
                        use_ray=False)


def _wrap(w: _Worker) -> None:
    """Optimiser and schedule, then the student wrapped: DeepSpeed, DDP (Ray Train) or plain."""
    import torch

    cfg = w.cfg
    w.params = [p for p in w.student.parameters() if p.requires_grad]
    w.optimizer = torch.optim.AdamW(w.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    w.scheduler = torch.optim.lr_scheduler.LambdaLR(w.optimizer, lambda s: lr_factor(s, cfg, w.last_step))
    if cfg.deepspeed is not None:
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro,
            # each backward pass is one DeepSpeed micro-step (MiniLLM makes two per micro-batch)
            "gradient_accumulation_steps": cfg.accumulation * w.backwards_per_micro,
            "zero_optimization": {"stage": cfg.deepspeed},
            "bf16": {"enabled": w.device.type != "cpu"},
            "gradient_clipping": cfg.grad_clip or 0.0,
        }
        w.engine, w.optimizer, _, w.scheduler = deepspeed.initialize(
            model=w.student, optimizer=w.optimizer, lr_scheduler=w.scheduler, config=ds_config)
        w.model = w.engine
    elif w.in_ray:
        import ray.train.torch

        w.model = ray.train.torch.prepare_model(w.student, move_to_device=w.device)
    else:
        w.model = w.student.to(w.device)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Train one student. ``config`` keys: ``cfg`` (a DistillConfig as a dict),
    ``teacher_dir``, ``student_dir``, ``data`` / ``eval_data`` (paths; or ``ray_data`` flags
    for Ray Data shards), ``lm_corpus`` (a token corpus reference, :mod:`cbd_ray.corpus`) or
    ``lm_data`` (a text file, tokenised here when run alone), ``vocab`` (shared vocabulary,
    None = check here), ``run_dir`` (local checkpoints and the failure-hook marker when run
    without Ray), ``ray`` (inside Ray Train).

    Returns the final metrics (also reported to Ray Train with each checkpoint) with
    ``history``: the metrics of every logged step.
    """
    import torch

    from cbd_ray import objectives

    cfg = DistillConfig(**config["cfg"])
    w = _identify(config, cfg)
    torch.manual_seed(cfg.seed)
    _load_models(w)
    _load_data(w)
    _wrap(w)
    start, totals, best = _resume(w)
    objective = objectives.build(cfg.objective)
    set_student_mode(w.model, cfg.dropout_off)
    t_run, metrics, history = time.time(), {}, []
    for step in range(start, w.last_step):
        _maybe_fail(w, step)
        metrics = _train_step(w, objective, step, totals)
        best = _after_step(w, metrics, best, history, totals)
    if not metrics and start >= w.last_step:  # a finished run started again: report its last state
        metrics = {"step": start, **{k: int(v) for k, v in totals.items()}, "checkpoint_log": list(w.ckpt_log),
                   **_end_metrics(w)}
        if w.in_ray:
            _checkpoint(w, start, totals, best, metrics)
    metrics["wall_s"] = time.time() - t_run
    return {**metrics, "history": history}


def _maybe_fail(w: _Worker, step: int) -> None:
    """Test hook: the first attempt crashes at ``fail_at_step`` (a marker file remembers it)."""
    if w.cfg.fail_at_step is None or step != w.cfg.fail_at_step or w.rank != 0:
        return
    if not w.config.get("run_dir"):
        raise CBDError("fail_at_step needs a run directory (run_dir) for its marker file")
    marker = Path(w.config["run_dir"]) / "injected_failure"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"step {step}\n")
        raise RuntimeError(f"injected failure at step {step} (fail_at_step)")


def _micro_batches(w: _Worker, step: int) -> tuple[list[dict], list[float]]:
    """This worker's micro-batches of optimiser step ``step`` and their weights: each one's
    share of the global batch's counted tokens (rows, for objectives that sample), so the
    weighted sum is the global batch's mean whatever the worker count. MiniLLM rolls out one
    batch of prompts every ``ppo_epochs`` steps and trains on it until the next: its batches
    follow the rollouts, so every prompt of an epoch's permutation is rolled out."""
    import torch

    from cbd_ray.data import collate

    cfg = w.cfg
    draw = step // steps_per_batch(cfg)  # which batch of the seeded record order
    if w.sharded:  # each worker holds its own shard: sample its part of the batch from it
        mine = global_indices(draw, cfg.per_worker, len(w.rows), cfg.seed + 7919 * w.rank)
    else:
        idx = global_indices(draw, cfg.batch_size, len(w.rows), cfg.seed)
        mine = idx[w.rank * cfg.per_worker:(w.rank + 1) * cfg.per_worker]
    micro = [collate([w.rows[i] for i in mine[j:j + cfg.micro]], w.pad) for j in range(0, len(mine), cfg.micro)]
    pre_counted = cfg.objective in ("sft", "kd") or (cfg.objective == "seqkd" and cfg.seqkd_source == "data")
    if pre_counted:
        counts = torch.tensor([float(b["loss_mask"][:, 1:].sum()) for b in micro], device=w.device)
        total = float(_all_reduce(counts.sum().clone(), w.world))
        return micro, [float(c) / max(total, 1.0) for c in counts]
    return micro, [b["input_ids"].shape[0] / cfg.batch_size for b in micro]


def _backward(w: _Worker, loss: Any, weight: float, last: bool) -> None:
    """Back-propagate one weighted loss term. DDP and DeepSpeed average gradients over
    workers, so the term is scaled by the world size; DDP syncs only on the step's last
    backward; DeepSpeed divides by its accumulation steps, so the term is multiplied back."""
    scaled = loss * weight * w.world
    if w.engine is not None:
        w.engine.backward(scaled * w.cfg.accumulation * w.backwards_per_micro)
        w.engine.step()  # a micro-step; the optimiser steps at DeepSpeed's accumulation boundary
        return
    sync_off = w.world > 1 and not last and hasattr(w.model, "no_sync")
    with (w.model.no_sync() if sync_off else _null()):
        scaled.backward()


def _train_step(w: _Worker, objective: Any, step: int, totals: dict[str, float]) -> dict[str, Any]:
    """One optimiser step over this worker's micro-batches; the metrics, summed over workers."""
    import torch

    from cbd_ray import objectives

    cfg, t0 = w.cfg, time.time()
    micro, weights = _micro_batches(w, step)
    step_loss, part_sums = torch.zeros((), device=w.device), {}
    for j, (b, wt) in enumerate(zip(micro, weights)):
        last = j == len(micro) - 1
        lm = None
        if w.lm is not None:  # the next rows of this worker's stream: one block per record
            w.lm.seek((step * cfg.per_worker) + j * cfg.micro)
            lm = torch.from_numpy(w.lm.take(b["input_ids"].shape[0])).to(w.device)
        ctx = objectives.StepContext(
            step=step, micro=j, vocab=w.vocab, pad_id=w.pad, eos_id=w.eos, max_len=cfg.max_len, lm_batch=lm,
            generator=torch.Generator(device=w.device).manual_seed(cfg.seed * 1_000_003 + step * 131 + w.rank * 17 + j),
            backward=(lambda part, wt=wt: _backward(w, part, wt, last=False)) if w.backwards_per_micro > 1 else None)
        with (torch.autocast(w.device.type, dtype=w.autocast_dtype) if w.autocast_dtype else _null()):
            loss, parts = objective(w.model, w.teacher, _to(b, w.device), cfg, ctx)
        _backward(w, loss, wt, last)
        step_loss += loss.detach().float() * wt
        for k, v in parts.items():
            part_sums[k] = part_sums.get(k, 0.0) + (v * wt if k not in _COUNTS else v)
    grad_norm = _optimiser_step(w)
    keys = sorted(part_sums)
    vec = _all_reduce(torch.tensor([float(step_loss)] + [part_sums[k] for k in keys], device=w.device,
                                   dtype=torch.float64), w.world).tolist()
    return _step_metrics(w, step, vec[0], dict(zip(keys, vec[1:])), totals, time.time() - t0, grad_norm)


def _optimiser_step(w: _Worker) -> float | None:
    """Clip and step (the plain path; DeepSpeed stepped at its accumulation boundary)."""
    import torch

    if w.engine is not None:
        return None
    grad_norm = float(torch.nn.utils.clip_grad_norm_(w.params, w.cfg.grad_clip)) if w.cfg.grad_clip else None
    w.optimizer.step()
    w.scheduler.step()
    w.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _step_metrics(w: _Worker, step: int, loss: float, parts: dict[str, float], totals: dict[str, float],
                  dt: float, grad_norm: float | None) -> dict[str, Any]:
    totals["student_tokens"] += parts.get("student_tokens", 0.0)
    totals["teacher_tokens"] += parts.get("teacher_tokens", 0.0)
    metrics = {
        "step": step + 1, "loss": loss, "lr": w.scheduler.get_last_lr()[0],
        **{f"loss_{k}": v for k, v in parts.items() if k not in _COUNTS},
        "tokens": parts.get("tokens", 0.0),
        "step_student_tokens": parts.get("student_tokens", 0.0),
        "step_teacher_tokens": parts.get("teacher_tokens", 0.0),
        "tokens_per_s": parts.get("student_tokens", 0.0) / max(dt, 1e-9),
        "student_tokens": int(totals["student_tokens"]), "teacher_tokens": int(totals["teacher_tokens"]),
        "step_time_s": dt,
        # when this attempt's first optimiser step ended (time to first step, bench/data_scale.py)
        "first_step_unix": w.first_step_unix or time.time(),
    }
    w.first_step_unix = metrics["first_step_unix"]
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    return metrics


def _after_step(w: _Worker, metrics: dict[str, Any], best: dict | None, history: list,
                totals: dict[str, float]) -> dict | None:
    """Evaluate, track the best checkpoint, log, checkpoint; returns the best so far. The
    run's last step (``w.last_step``: ``steps``, or sooner by ``max_prompt_epochs``) is always
    evaluated and checkpointed."""
    cfg, done, last = w.cfg, metrics["step"], w.last_step
    if done == last:
        metrics.update(_end_metrics(w))
    is_ckpt = done % cfg.checkpoint_every == 0 or done == last
    is_eval = bool(w.config.get("eval_data")) and (
        is_ckpt if cfg.eval_every is None else (done % cfg.eval_every == 0 or done == last))
    if is_eval:
        # the unwrapped model: a DDP forward may sync buffers, and shares differ in size
        metrics.update(_evaluate(w.student, w.teacher, w.eval_rows, cfg, w.vocab, w.pad, w.eos, w.device, w.world,
                                 w.autocast_dtype, w.tokenizer, w.config))
        set_student_mode(w.model, cfg.dropout_off)
        crit = cfg.best_metric
        if crit and crit[0] in metrics:
            better = best is None or (metrics[crit[0]] < best["value"] if crit[1] == "min"
                                      else metrics[crit[0]] > best["value"])
            if better:
                best = {"value": metrics[crit[0]], "step": done}
    if best is not None:
        metrics["best_step"], metrics["best_value"] = best["step"], best["value"]
    if w.log.every and (done % w.log.every == 0 or done == last or is_eval):
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                         if k.startswith(("loss", "eval_")) and isinstance(v, float))
        w.log(f"step {done}/{last} {shown} tok/s={metrics['tokens_per_s']:.0f} "
              f"student_tokens={metrics['student_tokens']} teacher_tokens={metrics['teacher_tokens']}")
    if is_ckpt:
        w.ckpt_log.append({k: v for k, v in metrics.items() if k in ("step", "loss") or k.startswith("eval_")})
        metrics["checkpoint_log"] = list(w.ckpt_log)
    history.append(metrics)
    if is_ckpt and (w.in_ray or w.config.get("run_dir")):
        _checkpoint(w, done, totals, best, metrics)
    elif w.in_ray and is_eval:
        import ray.train

        ray.train.report(metrics)
    return best


def _end_metrics(w: _Worker) -> dict[str, Any]:
    """What the last step's metrics add: what ended the run there (``stopped_by``) and, run
    alone, the records dropped for an over-long prompt (on Ray the driver adds its count)."""
    out: dict[str, Any] = {"stopped_by": w.stopped_by}
    if w.dropped_prompts is not None:
        out["dropped_prompts"] = w.dropped_prompts
    return out


_COUNTS = ("tokens", "student_tokens", "teacher_tokens", "on_policy")


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _evaluate(model: Any, teacher: Any, eval_rows: list[dict], cfg: DistillConfig, vocab: int | None, pad: int,
              eos: int | None, device: Any, world: int, autocast_dtype: Any, tokenizer: Any,
              config: dict[str, Any]) -> dict[str, float]:
    """Held-out metrics, token-weighted over every worker's share: ``eval_loss`` (the
    objective's own loss: CE, or the divergence it minimises) and ``eval_ce``; with
    ``select_best_by="rougeL"`` also ``eval_rougeL`` of greedy answers."""
    import torch

    from cbd_ray import objectives
    from cbd_ray.data import collate

    model.eval()
    sums: dict[str, float] = {}
    for j in range(0, len(eval_rows), cfg.micro):
        b = _to(collate(eval_rows[j:j + cfg.micro], pad), device)
        ctx = objectives.StepContext(vocab=vocab, pad_id=pad, eos_id=eos, max_len=cfg.max_len)
        with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else _null()):
            m = objectives.eval_loss(model, teacher, b, cfg, ctx)
        n = m.pop("tokens")
        sums["tokens"] = sums.get("tokens", 0.0) + n
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * n
    keys = sorted(sums)
    vec = _all_reduce(torch.tensor([sums[k] for k in keys] or [0.0], dtype=torch.float64, device=device), world).tolist()
    tot = dict(zip(keys, vec))
    n = max(tot.pop("tokens", 0.0), 1.0)
    out = {f"eval_{k}": v / n for k, v in tot.items()}
    if cfg.select_best_by == "rougeL":
        out["eval_rougeL"] = _rouge(model, eval_rows, cfg, pad, eos, device, world, tokenizer)
    return out


def _rouge(model: Any, eval_rows: list[dict], cfg: DistillConfig, pad: int, eos: int | None, device: Any,
           world: int, tokenizer: Any) -> float:
    """Mean Rouge-L of greedy answers to the first ``rouge_samples`` held-out prompts."""
    import torch

    from cbd_ray.data import collate, left_padded_prompts
    from cbd_ray.evaluate import rouge_l
    from cbd_ray.generate import sample
    from cbd_ray.objectives import unwrap

    hf = unwrap(model)
    rows = eval_rows[: max(1, cfg.rouge_samples // world)]
    score, count = 0.0, 0
    for j in range(0, len(rows), cfg.micro):
        chunk = rows[j:j + cfg.micro]
        b = _to(collate(chunk, pad), device)
        ids, attn = left_padded_prompts(b, pad)
        limit = getattr(hf.config, "n_positions", None) or getattr(hf.config, "max_position_embeddings", cfg.max_len)
        n_new = max(1, min(cfg.max_new_tokens, cfg.max_len - ids.shape[1], limit - ids.shape[1]))
        out = sample(hf, ids, attn, n_new, eos_token_id=eos, pad_token_id=pad, do_sample=False)
        for i, r in enumerate(chunk):
            got = out.sequences[i, out.prompt_length:][out.response_mask[i, out.prompt_length:]].tolist()
            ref = [t for t, m in zip(r["input_ids"], r["loss_mask"]) if m]
            score += rouge_l(tokenizer.decode(got, skip_special_tokens=True),
                             tokenizer.decode(ref, skip_special_tokens=True))
            count += 1
    vec = _all_reduce(torch.tensor([score, float(count)], dtype=torch.float64, device=device), world).tolist()
    return vec[0] / max(vec[1], 1.0)


# ------------------------------------------------------------------------------- checkpoints
#
# A checkpoint folder holds, from rank 0, the student as a Hugging Face directory (``model/``,
# what the driver exports) and ``state.pt`` (step, token counts, best so far; with the plain
# optimiser its moments and schedule); from every rank ``rng_<rank>.pt`` (its own dropout
# RNG); with DeepSpeed, ``deepspeed/`` written by the engine on every rank: fp32 master
# weights, optimiser moments and the scheduler, each rank its own partition. On Ray Train
# every rank reports its folder and Ray merges them into one checkpoint.

_STATE = "state.pt"
_MODEL = "model"
_DS = "deepspeed"
_DS_TAG = "ckpt"


def _save(w: _Worker, d: Path, step: int, totals: dict, best: dict | None) -> None:
    """Write this rank's part of a checkpoint into ``d``."""
    import torch

    if w.rank == 0:
        w.student.save_pretrained(d / _MODEL, safe_serialization=True)
        state = {"step": step, "totals": totals, "best": best, "torch_rng": torch.get_rng_state(),
                 "checkpoint_log": w.ckpt_log}
        if w.engine is None:
            state["optimizer"] = w.optimizer.state_dict()
            state["scheduler"] = w.scheduler.state_dict()
        torch.save(state, d / _STATE)
    torch.save(torch.get_rng_state(), d / f"rng_{w.rank}.pt")
    if w.engine is not None:  # a collective: every rank saves its own partition
        w.engine.save_checkpoint(str(d / _DS), tag=_DS_TAG, save_latest=False)


def _restore(w: _Worker, d: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`_save` into this rank; a checkpoint that cannot
    restore the run exactly (no DeepSpeed state for a DeepSpeed run) is refused."""
    import torch

    if not (d / _STATE).is_file():
        raise CheckpointError(f"checkpoint {d} lacks {_STATE}")
    state = torch.load(d / _STATE, weights_only=True, map_location="cpu")
    if w.engine is not None:
        if not (d / _DS / _DS_TAG).is_dir():
            raise CheckpointError(f"checkpoint {d} holds no DeepSpeed state ({_DS}/{_DS_TAG}): resuming from its "
                                  "weights alone would restart the optimiser; remove the run's checkpoints to start over")
        # DeepSpeed's own files (written by this run, in its own format) restore the fp32
        # masters, the moments and the schedule; loading weights into the module would not
        path, _ = w.engine.load_checkpoint(str(d / _DS), tag=_DS_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {d / _DS}")
    else:
        _load_weights(d, w.student)
        if "optimizer" in state:
            w.optimizer.load_state_dict(state["optimizer"])
            w.scheduler.load_state_dict(state["scheduler"])
    rng = d / f"rng_{w.rank}.pt"
    torch.set_rng_state(torch.load(rng, weights_only=True) if rng.is_file() else state["torch_rng"])
    return state


def _load_weights(d: Path, hf_student: Any) -> None:
    """The checkpoint's safetensors into the student (tied weights may be missing)."""
    from safetensors.torch import load_file

    files = sorted((d / _MODEL).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {d} lacks {_MODEL}/*.safetensors")
    weights: dict[str, Any] = {}
    for f in files:
        weights.update(load_file(f))
    missing, unexpected = hf_student.load_state_dict(weights, strict=False)
    # tied weights (GPT-2's lm_head) are saved once: only those may be missing
    tied = {k for k in missing if "lm_head" in k or "embed_out" in k}
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"checkpoint {d} does not match the student: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    hf_student.tie_weights()


def _resume(w: _Worker) -> tuple[int, dict[str, float], dict | None]:
    """(first step, token totals, best so far): from the latest checkpoint, else fresh."""
    ckpt = _latest_checkpoint(w.config, w.in_ray)
    if ckpt is None:
        return 0, {"student_tokens": 0.0, "teacher_tokens": 0.0}, None
    with ckpt as d:
        state = _restore(w, Path(d))
    w.ckpt_log = list(state.get("checkpoint_log") or [])
    w.log(f"resumed at step {state['step']}")
    return int(state["step"]), dict(state["totals"]), state.get("best")


class _Dir:
    """Context manager yielding a local checkpoint directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc: Any) -> None:
        return None


def _local_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    found = sorted(Path(run_dir, "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return [p for p in found if (p / _STATE).is_file()]


def _latest_checkpoint(config: dict[str, Any], in_ray: bool) -> Any:
    """A context manager giving the directory to resume from, or None."""
    if in_ray:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt is not None else None
    found = _local_checkpoints(config["run_dir"]) if config.get("run_dir") else []
    return _Dir(found[-1]) if found else None


def _checkpoint(w: _Worker, step: int, totals: dict, best: dict | None, metrics: dict) -> None:
    """Save this rank's part of the checkpoint and report it to Ray Train (every rank: Ray
    merges the folders), or keep it under ``run_dir/checkpoints`` when run alone."""
    tmp = Path(tempfile.mkdtemp(prefix="cbd_ckpt_"))
    _save(w, tmp, step, totals, best)
    if w.in_ray:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        shutil.rmtree(tmp, ignore_errors=True)
    elif w.config.get("run_dir"):
        final = Path(w.config["run_dir"]) / "checkpoints" / f"step_{step}"
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        shutil.move(str(tmp), final)
        (final / "metrics.json").write_text(json.dumps(metrics, default=float))
        _prune_local(w.config["run_dir"], w.cfg.keep_checkpoints, best)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune_local(run_dir: str, keep: int | None, best: dict | None) -> None:
    """Keep the ``keep`` newest local checkpoints and the best one (as Ray Train keeps the
    best ``num_to_keep`` and always the latest)."""
    if not keep:
        return
    found = _local_checkpoints(run_dir)
    spare = {f"step_{best['step']}"} if best else set()
    for p in found[:-keep]:
        if p.name not in spare:
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------- the driver


def _check_model_dir(path: str | os.PathLike, role: str) -> Path:
    """Cheap checks on the driver (cbd_ray.checks): config, weights' headers and sizes."""
    from cbd_ray.checks import check_model_dir

    return check_model_dir(path, role, tokenizer=False)


def check_cluster(cfg: DistillConfig, resource: str | None) -> dict[str, float]:
    """Raise a clear error when the running Ray cluster cannot hold ``cfg.workers`` workers."""
    import ray

    have = ray.cluster_resources()
    need = {"CPU": cfg.workers * cfg.cpus_per_worker}
    if resource:
        need[resource] = float(cfg.workers)
    short = {k: v for k, v in need.items() if have.get(k, 0.0) < v}
    if short:
        what = ", ".join(f"{k}={have.get(k, 0.0):g}" for k in sorted(set(need) | {"CPU", "GPU"}))
        raise CBDError(f"{cfg.workers} workers need {', '.join(f'{k}={v:g}' for k, v in need.items())} "
                       f"but the Ray cluster has {what}: lower workers (or cpus_per_worker) or add nodes")
    return have




def shard_datasets(ds: Any, world: int) -> dict[str, Any]:
    """Every training worker's own shard of the tokenised records, as Ray Train datasets
    ``data_0 .. data_{world-1}`` (worker ``r`` reads only ``data_r``: records ``r::world`` in
    record order, equal sizes), so adding workers adds throughput instead of multiplying
    reads.

    Why not ``streaming_split``: it hands blocks to whichever worker asks first, so a resumed
    run would see other batches; these shards are the same on every attempt, which keeps
    resume bit-identical. The shards are put in the object store by the driver, so they live
    on the driver's node and survive the loss of the worker node that tokenised them (blocks
    made by an actor cannot be rebuilt once their node is gone)."""
    return shard_table(records_table(ds), world)


def records_table(ds: Any) -> Any:
    """The tokenised records of a materialised Dataset as one Arrow table on the driver, in
    record (``idx``) order."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    return table.take(pc.sort_indices(table, sort_keys=[("idx", "ascending")]))


def shard_table(table: Any, world: int) -> dict[str, Any]:
    """``shard_datasets`` for records already in one table."""
    import ray

    per = table.num_rows // world
    if per == 0:
        raise CBDError(f"{table.num_rows} training records cannot be shared by {world} workers")
    return {f"data_{r}": ray.data.from_arrow(table.take(list(range(r, per * world, world)))) for r in range(world)}


def _starts_uri(root: Any, run_name: str) -> str:
    """Where rank 0 leaves one marker per worker-group start of this ``fit()`` (a fresh
    folder per call, beside the Ray Train run in its storage)."""
    import uuid

    from cbd_ray.storage import uri_join

    return uri_join(str(root), f"{run_name}.starts-{uuid.uuid4().hex[:12]}")


def _count_start(uri: str) -> None:
    """Leave an empty marker file under ``uri``. The run's storage is durable and reachable
    from every node, unlike an actor, which a lost node (or a busy head) can take with it."""
    import uuid

    from cbd_ray.storage import uri_join, write_bytes

    try:
        write_bytes(uri_join(uri, uuid.uuid4().hex), b"")
    except Exception:  # noqa: BLE001 - counting is bookkeeping; training goes on
        logger.warning("could not record this worker-group start under %s", uri, exc_info=True)


def _restarts(uri: str) -> int:
    """Worker-group restarts of one ``fit()``: its starts - 1 (-1: unknown, no marker was
    written). The markers are removed once counted."""
    from cbd_ray.storage import StorageError, delete_dir, list_files

    try:
        n = len(list_files(uri))
        delete_dir(uri)
    except StorageError:
        logger.warning("could not count the worker-group starts under %s", uri, exc_info=True)
        return -1
    return n - 1 if n else -1


def _identity(x: Any) -> str:
    """What a model or data input *is*, for the run key: its checksums, never its path."""
    from cbd_ray.storage import dir_checksums, file_sha256

    if isinstance(x, dict) and "index" in x:  # a token corpus: its key names source, tokenizer, length
        return x["index"]["key"]
    if isinstance(x, dict):
        return config_hash([x["checksums"], x.get("file")])
    if is_remote(str(x)):
        from cbd_ray.corpus import source_checksum

        return source_checksum(str(x))
    p = Path(x)
    return file_sha256(p) if p.is_file() else config_hash(dir_checksums(p))


def run_key(cfg: "DistillConfig", teacher: Any, student: Any, data: Any, eval_data: Any, lm_data: Any) -> str:
    """A hash of the settings and inputs of a Ray Train run: a run whose settings or inputs
    changed gets another key, so it never resumes another run's checkpoints."""
    settings = cfg.model_dump(mode="json", exclude={"fail_at_step", "log_every"})
    ins = {k: (_identity(v) if v else None) for k, v in
           {"teacher": teacher, "student": student, "data": data, "eval": eval_data, "lm": lm_data}.items()}
    return config_hash({"settings": settings, "inputs": ins})[:16]


def run_distill(teacher_dir: Any, student_dir: Any, data: str | os.PathLike,
                out_dir: str | os.PathLike, cfg: DistillConfig, eval_data: Any = None,
                storage_path: str | os.PathLike | None = None, max_failures: int = 0, overwrite: bool = False,
                name: str = "distill", lm_data: Any = None, log: Any = None) -> dict[str, Any]:
    """Distil ``teacher_dir`` into ``student_dir`` on Ray Train; write the result to
    ``out_dir`` (a Hugging Face directory: safetensors, config, tokenizer, ``distill.json``).

    Models, ``eval_data`` and ``lm_data`` are local paths (a run on one machine or a shared
    volume) or storage references (:func:`cbd_ray.storage.make_ref`), which each worker
    fetches into its node's cache: no worker reads a path that exists only on the driver.
    ``data`` is read on the driver and reaches the workers through Ray Data. The driver
    decides the device from the cluster's resources and needs no accelerator itself.
    ``storage_path``: where Ray Train keeps checkpoints (a local path or a URI); the run's
    name there is ``name`` plus a hash of its settings and inputs (:func:`run_key`).
    ``max_failures``: worker-group restarts from the last checkpoint (a lost node).

    Returns the final metrics plus ``selected_step`` (the checkpoint written: the best by
    ``cfg.select_best_by`` on ``eval_data``, else the last), ``out``, ``wall_s``,
    ``restarts``, ``stopped_by`` (``steps`` or ``max_prompt_epochs``), ``truncated`` and
    ``dropped_prompts`` (training records cut to ``max_len``, or dropped for a prompt over
    ``max_prompt_len``).
    """
    from cbd_ray.storage import atomic_directory

    t0 = time.time()
    say = log or (lambda m: logger.info("%s", m))
    if not isinstance(cfg, DistillConfig):
        raise ConfigError(f"cfg must be a DistillConfig, got {type(cfg).__name__}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {str(out)!r} already exists; pass overwrite to replace it")
    s_dir, t_dir, s_tok, vocab, records = _driver_checks(teacher_dir, student_dir, data, cfg, eval_data, lm_data)
    cfg = cfg.resolved(t_dir, s_dir, name, bool(lm_data or cfg.lm_data) and uses_lm_text(cfg), say)  # micro_batch auto: planned
    key = run_key(cfg, teacher_dir if cfg.needs_teacher else None, student_dir, data, eval_data, lm_data)
    _local_device_check(cfg)
    connect_ray()
    import ray

    from cbd_ray import devices

    spec, why = devices.plan(cfg.device, ray.cluster_resources())
    say(f"[distill] {why}")
    check_cluster(cfg, spec.ray_resource)
    root = str(storage_path) if storage_path else str(out.parent / f".{out.name}.work")
    corpus = lm_corpus(cfg, lm_data, student_dir, uri_join(root, "corpora"), say)
    result, run_name, restarts, counts = _fit(cfg, spec, records, s_dir, key, name, storage_path, out, max_failures, {
        "teacher_dir": worker_ref(teacher_dir if cfg.needs_teacher else student_dir),
        "student_dir": worker_ref(student_dir), "lm_corpus": corpus,
        "eval_data": worker_ref(eval_data) if eval_data is not None else None}, say)
    chosen, metrics = _choose(result, cfg, eval_data is not None, run_name)
    metrics.update({"out": str(out), "wall_s": time.time() - t0, "objective": cfg.objective, "workers": cfg.workers,
                    "device": spec.kind, "restarts": restarts, "run_key": key, **counts})
    with chosen.as_directory() as d:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            for f in (Path(d) / _MODEL).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            fit_tokenizer(s_tok, json.loads((tmp / "config.json").read_text())).save_pretrained(tmp)
            (tmp / "distill.json").write_text(json.dumps(
                {"teacher": ref_label(teacher_dir), "student": ref_label(student_dir), "data": ref_label(data),
                 "config": cfg.model_dump(), "metrics": metrics}, indent=2, sort_keys=True, default=str) + "\n")
            write_distilled_card(tmp, out.name, teacher_dir, student_dir, cfg.model_dump(), metrics)
    return metrics


def _local_device_check(cfg: DistillConfig) -> None:
    """Without a cluster to join, this machine is the cluster: an accelerator it lacks is
    refused here, before a local Ray starts (on a cluster, the cluster's resources decide)."""
    import ray

    from cbd_ray import devices

    if cfg.device in ("cuda", "npu") and not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        try:
            devices.resolve(cfg.device)
        except RuntimeError as exc:
            raise CBDError(str(exc)) from None


def uses_lm_text(cfg: DistillConfig) -> bool:
    """Only MiniLLM's pretraining term reads ``lm_data`` (other objectives ignore it)."""
    return cfg.objective == "minillm" and cfg.lm_coef != 0


def _lm_source(lm: Any) -> str:
    """The text of ``lm_data`` as a path or URI (a storage reference names one file)."""
    from cbd_ray.storage import uri_join

    if isinstance(lm, dict):
        return uri_join(lm["uri"], lm["file"]) if lm.get("file") else lm["uri"]
    return str(Path(lm).expanduser().resolve()) if not is_remote(str(lm)) else str(lm)


def _check_lm_source(lm: Any) -> None:
    """A missing or unreadable pretraining text stops the run before any work."""
    from cbd_ray.corpus import check_text_source
    from cbd_ray.storage import redact, uri_exists

    if isinstance(lm, dict) and "index" in lm:
        return  # an already tokenised corpus
    src = _lm_source(lm)
    check_text_source(src)
    if not uri_exists(src):
        raise FileNotFoundError(f"lm_data {redact(src)!r} not found")


def lm_corpus(cfg: DistillConfig, lm_data: Any, tokenizer_ref: Any, root: str, say: Any = None) -> dict | None:
    """MiniLLM's pretraining text as a token corpus under ``root`` (built once by Ray Data,
    reused by every later run; :mod:`cbd_ray.corpus`); None when the objective reads none."""
    from cbd_ray.corpus import build_corpus

    lm = lm_data or cfg.lm_data
    if not lm or not uses_lm_text(cfg):
        return None
    if isinstance(lm, dict) and "index" in lm:
        return lm
    return build_corpus(_lm_source(lm), tokenizer_ref, cfg.max_len, root, actors=cfg.actors, say=say)


def _driver_checks(teacher_dir: Any, student_dir: Any, data: Any, cfg: DistillConfig, eval_data: Any,
                   lm_data: Any) -> tuple[Path, Path, Any, int | None, list[dict]]:
    """Everything checkable on the driver, before Ray: models, vocabularies, data lines."""
    from transformers import AutoConfig

    from cbd_ray.data import check_vocab, read_instructions

    s_dir = _check_model_dir(driver_path(student_dir), "student")
    t_dir = _check_model_dir(driver_path(teacher_dir), "teacher") if cfg.needs_teacher else s_dir
    lm = lm_data or cfg.lm_data
    if lm and uses_lm_text(cfg):
        _check_lm_source(lm)
    s_tok = _load_tokenizer(str(s_dir))
    t_tok = None
    try:
        t_tok = _load_tokenizer(str(t_dir)) if t_dir != s_dir else s_tok
    except (OSError, ValueError):
        pass  # a teacher saved without its tokenizer shares the student's
    vocab = check_vocab(AutoConfig.from_pretrained(t_dir), AutoConfig.from_pretrained(s_dir), t_tok, s_tok)
    records = read_instructions(driver_path(data), cfg.data_limit, require_response=cfg.needs_responses)
    if eval_data is not None:
        read_instructions(driver_path(eval_data), cfg.eval_limit, require_response=True)
    return s_dir, t_dir, s_tok, vocab, records


def _fit(cfg: DistillConfig, spec: Any, records: list[dict], s_dir: Path, key: str, name: str,
         storage_path: Any, out: Path, max_failures: int, refs: dict[str, Any],
         say: Any) -> tuple[Any, str, int, dict[str, int]]:
    """Tokenise with Ray Data actors, then one TorchTrainer run; (result, run name, restarts,
    data counts: ``truncated`` and ``dropped_prompts``)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cbd_ray.storage import filesystem, is_remote

    table, counts = _tokenise(cfg, records, refs["student_dir"], say)
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if spec.ray_resource == "NPU":
        resources["NPU"] = 1
    root = storage_path if storage_path else out.parent / f".{out.name}.work"
    if not is_remote(root):
        Path(root).mkdir(parents=True, exist_ok=True)
    fs, fs_path = filesystem(root)
    run_name = f"{name}-{key}"
    starts = _starts_uri(root if is_remote(root) else fs_path, run_name)
    shorten_train_shutdown()
    crit = cfg.best_metric if refs.get("eval_data") is not None else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        # log_every resolved here, so workers follow the driver's console (-v) wherever they run
        train_loop_config={"cfg": {**cfg.model_dump(), "log_every": cfg.log_interval}, **refs, "data": None,
                           "ray_data": {"data": True}, "vocab": None, "run_dir": None if is_remote(root) else str(Path(fs_path) / run_name),
                           "ray": True, "device_kind": spec.kind, "starts": starts},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=spec.kind == "cuda",
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend=spec.backend),
        run_config=RunConfig(
            name=run_name, storage_path=fs_path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute=crit[0] if crit else None,
                                               checkpoint_score_order=crit[1] if crit else "max"),
        ),
        datasets=shard_table(table, cfg.workers),
        dataset_config=DataConfig(datasets_to_split=[]),  # already one shard per worker
        # No resume_from_checkpoint (deprecated in Train V2): a rerun with the same RunConfig
        # (storage, name = settings hash) restores the run's checkpoints.
    )
    result = trainer.fit()
    restarts = _restarts(starts)
    if result.error is not None:
        oom = out_of_memory_error(result.error, name)
        if oom is not None:
            raise oom from result.error
        raise result.error
    return result, run_name, restarts, counts


def _tokenise(cfg: DistillConfig, records: list[dict], tokenizer_ref: Any, say: Any) -> tuple[Any, dict[str, int]]:
    """The training records tokenised by Ray Data actors (or, few and ``data_actors: auto``, in
    this process: the same table without an actor pool's start), as one table in record order, and
    the counts: records ``truncated`` to ``max_len``, records dropped for a prompt over
    ``max_prompt_len`` (``dropped_prompts``); both are logged. Tokenised now, before the
    training workers take the CPUs the tokenizer actors need."""
    import pyarrow.compute as pc
    import ray

    from cbd_ray.data import kept_rows, tokenize_dataset, tokenize_in_process

    items = [{**r, "idx": i} for i, r in enumerate(records)]
    how = {"on_overflow": cfg.on_overflow, "with_response": cfg.needs_responses, "max_prompt_len": cfg.max_prompt_len}
    if cfg.data_actors == "auto" and len(records) <= DRIVER_TOKENISE_RECORDS:
        table = tokenize_in_process(items, tokenizer_ref, cfg.max_len, **how)
    else:
        ds = tokenize_dataset(ray.data.from_items(items), tokenizer_ref, cfg.max_len, actors=cfg.actors, **how)
        table = records_table(ds.materialize())
    # counted here, from the table the shards are cut from (a Dataset.sum is one more Ray Data
    # execution: ~4 s a stage on 2 cores)
    table, dropped = kept_rows(table)
    cut = int(pc.sum(table["truncated"]).as_py() or 0) if table.num_rows else 0
    if cut:
        say(f"[distill] truncated {cut} of {len(records)} records to max_len={cfg.max_len} tokens")
    if dropped:
        say(f"[distill] dropped {dropped} of {len(records)} records whose prompt is over "
            f"max_prompt_len={cfg.max_prompt_len} tokens")
    if not table.num_rows:
        raise CBDError(f"every one of the {len(records)} training prompts is over max_prompt_len="
                       f"{cfg.max_prompt_len} tokens: raise max_prompt_len or set it to null")
    last, why = planned_steps(cfg, (table.num_rows // cfg.workers) * cfg.workers)
    if why != "steps":
        say(f"[distill] the run stops after step {last} of {cfg.steps}: max_prompt_epochs="
            f"{cfg.max_prompt_epochs:g} over {table.num_rows} training records at {cfg.batch_size} a step")
    return table, {"truncated": cut, "dropped_prompts": dropped}


def out_of_memory_error(error: BaseException, stage: str) -> CBDError | None:
    """One line for a worker that Ray's memory monitor killed (its message is buried in the
    controller's log): the stage, the nodes' memory and what to change; None for other errors."""
    text = f"{error}\n{getattr(error, '__cause__', '') or ''}"
    if "low on memory" not in text and "OutOfMemoryError" not in text:
        return None
    try:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        mem = ", ".join(f"{n['Resources'].get('memory', 0) / 2**30:.0f} GiB" for n in nodes) or "unknown"
    except Exception:  # noqa: BLE001 - the advice stands without the figures
        mem = "unknown"
    return CBDError(f"{stage}: a training worker was killed because its node ran out of memory (Ray memory per node: "
                    f"{mem}); lower micro_batch (or use micro_batch: auto), set gradient_checkpointing: true, "
                    "add workers or nodes, or check the plan with `cbd validate CONFIG --plan`")


def _choose(result: Any, cfg: DistillConfig, has_eval: bool, run_name: str) -> tuple[Any, dict[str, Any]]:
    """The checkpoint to write (best by ``select_best_by`` when evaluated, else the last)
    and the metrics, with one entry per checkpointed step."""
    metrics = dict(result.metrics or {})
    crit = cfg.best_metric if has_eval else None
    chosen, chosen_metrics = result.checkpoint, metrics
    if crit is not None and result.best_checkpoints:
        scored = [(c, m) for c, m in result.best_checkpoints if crit[0] in m]
        if scored:
            chosen, chosen_metrics = (min if crit[1] == "min" else max)(scored, key=lambda cm: cm[1][crit[0]])
    if chosen is None:
        raise CheckpointError(f"the run {run_name} produced no checkpoint")
    metrics["selected_step"] = int(chosen_metrics.get("step", 0))
    # one entry per step: a finished run started again re-reports its last step; the
    # workers' log holds the checkpoints Ray Train no longer keeps (keep_checkpoints)
    logged = metrics.pop("checkpoint_log", None) or []
    by_step = {m.get("step", 0): {k: v for k, v in m.items() if k in ("step", "loss") or k.startswith("eval_")}
               for m in [*logged, *(m for _, m in result.best_checkpoints)]}
    metrics["checkpoints"] = [by_step[k] for k in sorted(by_step)]
    if crit is not None and crit[0] in chosen_metrics:
        metrics[f"selected_{crit[0]}"] = chosen_metrics[crit[0]]
    return chosen, metrics

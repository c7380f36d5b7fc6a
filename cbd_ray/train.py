"""One chain step: a distillation run, as a plain per-worker loop wrapped by Ray Train.

``train_loop_per_worker(config)`` is ordinary torch: it runs alone (world size 1, no Ray)
or as each worker of a ``ray.train.torch.TorchTrainer``. Everything it needs travels in its
``config`` dict (never module globals). The student is trained in float32 master weights
(bf16 autocast on accelerators), wrapped by ``ray.train.torch.prepare_model`` (DDP) or by
DeepSpeed when ``deepspeed`` is set; the teacher is frozen (eval mode, no gradients, bf16 on
accelerators) and never wrapped.

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
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from cbd_ray.cards import fit_tokenizer, write_distilled_card
from cbd_ray.config import Strict
from cbd_ray.errors import CBDError, CheckpointError, ConfigError
from cbd_ray.session import connect_ray, shorten_train_shutdown
from cbd_ray.storage import driver_path, ref_label, worker_ref

logger = logging.getLogger(__name__)

Objective = Literal["sft", "kd", "on_policy", "seqkd", "minillm"]
Divergence = Literal["fkl", "rkl", "jsd", "sfkl", "srkl"]


class DistillConfig(Strict):
    """Settings of one distillation run. Defaults follow the paper (temperature 1, length
    512, clip 0.2, teacher mix 0.2, 4 inner epochs) and, for MiniLLM's settings the paper does
    not give (γ, reward scale and clip, whitening, the pretraining term), the LMOps reference."""

    objective: Objective = "kd"
    divergence: Divergence = "rkl"
    steps: PositiveInt = 100
    batch_size: PositiveInt = 8            # global: records per optimiser step over all workers
    micro_batch: PositiveInt | None = None  # records per forward on one worker; None = all of its share
    max_len: PositiveInt = 512
    on_overflow: Literal["truncate", "error"] = "truncate"
    data_limit: PositiveInt | None = None
    eval_limit: PositiveInt | None = 64
    lr: float = Field(default=1e-5, gt=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup: int = Field(default=0, ge=0)   # steps of linear warm-up
    schedule: Literal["cosine", "constant"] = "cosine"
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
    lm_data: str | None = None              # plain text (.txt, or .jsonl with "text") for the LM loss
    # bookkeeping
    checkpoint_every: PositiveInt = 100
    eval_every: PositiveInt | None = None   # None: at every checkpoint
    log_every: int = Field(default=1, ge=0)  # 0: silent
    select_best_by: Literal["last", "loss", "ce", "rougeL"] = "loss"
    rouge_samples: PositiveInt = 32
    # scaling
    workers: PositiveInt = 1
    cpus_per_worker: float = Field(default=1, gt=0)
    data_actors: PositiveInt = 1
    device: Literal["auto", "cuda", "npu", "cpu"] = "auto"
    deepspeed: Literal[0, 1, 2, 3] | None = None
    seed: int = 0
    fail_at_step: PositiveInt | None = None  # test hook: the first attempt crashes once this many steps are done

    @model_validator(mode="after")
    def _batches(self) -> "DistillConfig":
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of workers {self.workers} "
                             "(each worker takes an equal share of the global batch)")
        share = self.batch_size // self.workers
        if self.micro_batch is not None and share % self.micro_batch:
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
    def micro(self) -> int:
        return self.micro_batch or self.per_worker

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


def lr_factor(step: int, cfg: DistillConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimiser step ``step`` (0-based): linear warm-up, then
    cosine decay to ``min_lr_ratio`` or constant."""
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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


def _rows(config: dict[str, Any], key: str, tokenizer: Any, cfg: DistillConfig, with_response: bool) -> list[dict]:
    """Encoded rows of the train (``key="data"``) or eval data: from the Ray Data shard when
    the driver passed one, else tokenised here."""
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
        return [r for _, r in sorted(zip(order, rows), key=lambda x: x[0])]
    path = config.get(key)
    if not path:
        return []
    from cbd_ray.storage import materialize

    path = str(materialize(path))
    limit = cfg.data_limit if key == "data" else cfg.eval_limit
    return encode_records(tokenizer, read_instructions(path, limit, require_response=with_response),
                          cfg.max_len, cfg.on_overflow, with_response)


class _Log:
    def __init__(self, rank: int, every: int) -> None:
        self.rank, self.every = rank, every

    def __call__(self, msg: str) -> None:
        if self.rank == 0 and self.every:
            # a Ray worker's stdout is Ray's channel to the driver's console (logging in a
            # worker has no handler); rank 0 only, so a line appears once
            print(f"[distill] {msg}", flush=True)


# ------------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Train one student. ``config`` keys: ``cfg`` (a DistillConfig as a dict),
    ``teacher_dir``, ``student_dir``, ``data`` / ``eval_data`` (paths; or ``ray_data`` flags
    for Ray Data shards), ``vocab`` (shared vocabulary, None = check here), ``run_dir`` (local
    checkpoints and the failure-hook marker when run without Ray), ``ray`` (inside Ray Train).

    Returns the final metrics (also reported to Ray Train with each checkpoint) with
    ``history``: the metrics of every logged step.
    """
    import torch

    from cbd_ray import devices, objectives
    from cbd_ray.data import check_vocab, collate, pack_text, pad_id, read_text

    cfg = DistillConfig(**config["cfg"])
    in_ray = bool(config.get("ray"))
    if in_ray:
        import ray.train
        import ray.train.torch

        tctx = ray.train.get_context()
        rank, world = tctx.get_world_rank(), tctx.get_world_size()
        # resolved here, on the worker: the driver may have no accelerator at all
        device = devices.worker_device(config.get("device_kind") or "cpu")
        if rank == 0 and config.get("starts") is not None:
            _count_start(config["starts"])
    else:
        rank, world = 0, 1
        device = devices.resolve(cfg.device).torch_device()
    log = _Log(rank, cfg.log_every)
    accel = device.type != "cpu"
    autocast_dtype = torch.bfloat16 if accel else None
    torch.manual_seed(cfg.seed)

    from cbd_ray.storage import materialize

    student_dir = str(materialize(config["student_dir"]))  # a reference: fetched into this node's cache
    tokenizer = _load_tokenizer(student_dir)
    student = _load_model(student_dir, torch.float32)
    teacher = None
    if cfg.needs_teacher:
        teacher = _load_model(str(materialize(config["teacher_dir"])), torch.bfloat16 if accel else torch.float32)
        teacher.eval().requires_grad_(False)  # frozen, never wrapped for gradients
        teacher.to(device)
    vocab = config.get("vocab")
    if vocab is None and teacher is not None:
        vocab = check_vocab(teacher.config, student.config)
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id

    rows = _rows(config, "data", tokenizer, cfg, cfg.needs_responses)
    sharded = bool(config.get("ray_data", {}).get("data")) and world > 1  # rows are this worker's shard
    if not rows:
        raise CBDError("the training data is empty")
    eval_rows = _rows(config, "eval_data", tokenizer, cfg, True)[rank::world]
    lm_ref = config.get("lm_data") or cfg.lm_data
    uses_lm = uses_lm_text(cfg) and lm_ref
    lm_blocks = pack_text(tokenizer, read_text(materialize(lm_ref)), cfg.max_len) if uses_lm else None

    # ---- wrap the student
    engine = None
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if cfg.deepspeed is not None:
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro,
            "gradient_accumulation_steps": cfg.accumulation,
            "zero_optimization": {"stage": cfg.deepspeed},
            "bf16": {"enabled": accel},
            "gradient_clipping": cfg.grad_clip or 0.0,
        }
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=student, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        model = engine
    elif in_ray:
        model = ray.train.torch.prepare_model(student, move_to_device=device)
    else:
        model = student.to(device)
    hf_student = objectives.unwrap(model)

    # ---- resume
    start, totals, history, best = 0, {"student_tokens": 0.0, "teacher_tokens": 0.0}, [], None
    ckpt_dir = _latest_checkpoint(config, in_ray)
    if ckpt_dir is not None:
        with ckpt_dir as d:
            state = _load_state(Path(d), hf_student, optimizer if engine is None else None,
                                scheduler if engine is None else None)
        start, totals, best = state["step"], state["totals"], state.get("best")
        if engine is not None:  # DeepSpeed: the LR schedule follows the step; moments restart
            for _ in range(start):
                scheduler.step()
        log(f"resumed at step {start}")

    objective = objectives.build(cfg.objective)
    pre_counted = cfg.objective in ("sft", "kd") or (cfg.objective == "seqkd" and cfg.seqkd_source == "data")
    model.train()
    t_run = time.time()
    metrics: dict[str, Any] = {}
    for step in range(start, cfg.steps):
        if cfg.fail_at_step is not None and step == cfg.fail_at_step and rank == 0:
            if not config.get("run_dir"):
                raise CBDError("fail_at_step needs a run directory (run_dir) for its marker file")
            marker = Path(config["run_dir"]) / "injected_failure"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"step {step}\n")
                raise RuntimeError(f"injected failure at step {step} (fail_at_step)")
        t0 = time.time()
        if sharded:  # each worker holds its own shard: sample its part of the batch from it
            mine = global_indices(step, cfg.per_worker, len(rows), cfg.seed + 7919 * rank)
        else:
            idx = global_indices(step, cfg.batch_size, len(rows), cfg.seed)
            mine = idx[rank * cfg.per_worker:(rank + 1) * cfg.per_worker]
        micro = [collate([rows[i] for i in mine[j:j + cfg.micro]], pad) for j in range(0, len(mine), cfg.micro)]
        if pre_counted:
            counts = torch.tensor([float(b["loss_mask"][:, 1:].sum()) for b in micro], device=device)
            total = float(_all_reduce(counts.sum().clone(), world))
            weights = [float(c) / max(total, 1.0) for c in counts]
        else:
            weights = [b["input_ids"].shape[0] / cfg.batch_size for b in micro]
        step_loss = torch.zeros((), device=device)
        part_sums: dict[str, float] = {}
        for j, (b, w) in enumerate(zip(micro, weights)):
            ctx = objectives.StepContext(
                step=step, micro=j, vocab=vocab, pad_id=pad, eos_id=eos, max_len=cfg.max_len,
                generator=torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * 131 + rank * 17 + j),
                lm_batch=None if lm_blocks is None else lm_blocks[
                    torch.randint(len(lm_blocks), (b["input_ids"].shape[0],),
                                  generator=torch.Generator().manual_seed(cfg.seed + step * 31 + rank))].to(device))
            sync_off = (engine is None and world > 1 and j < len(micro) - 1 and hasattr(model, "no_sync"))
            with (model.no_sync() if sync_off else _null()):
                with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else _null()):
                    loss, parts = objective(model, teacher, _to(b, device), cfg, ctx)
                # DDP / DeepSpeed average gradients over workers: scale by the world size so
                # the sum of weighted micro-batch losses is the global batch's mean
                scaled = loss * w * world
                if engine is not None:
                    engine.backward(scaled * cfg.accumulation)  # DeepSpeed divides by its accumulation
                    engine.step()
                else:
                    scaled.backward()
            step_loss += loss.detach().float() * w
            for k, v in parts.items():
                part_sums[k] = part_sums.get(k, 0.0) + (v * w if k not in _COUNTS else v)
        grad_norm = None
        if engine is None:
            if cfg.grad_clip:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        keys = sorted(part_sums)
        vec = _all_reduce(torch.tensor([float(step_loss)] + [part_sums[k] for k in keys], device=device,
                                       dtype=torch.float64), world).tolist()
        dt = time.time() - t0
        parts_g = dict(zip(keys, vec[1:]))
        totals["student_tokens"] += parts_g.get("student_tokens", 0.0)
        totals["teacher_tokens"] += parts_g.get("teacher_tokens", 0.0)
        metrics = {
            "step": step + 1, "loss": vec[0], "lr": scheduler.get_last_lr()[0],
            **{f"loss_{k}": v for k, v in parts_g.items() if k not in _COUNTS},
            "tokens": parts_g.get("tokens", 0.0),
            "step_student_tokens": parts_g.get("student_tokens", 0.0),
            "step_teacher_tokens": parts_g.get("teacher_tokens", 0.0),
            "tokens_per_s": parts_g.get("student_tokens", 0.0) / max(dt, 1e-9),
            "student_tokens": int(totals["student_tokens"]), "teacher_tokens": int(totals["teacher_tokens"]),
            "step_time_s": dt,
        }
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        done = step + 1
        is_ckpt = done % cfg.checkpoint_every == 0 or done == cfg.steps
        is_eval = bool(config.get("eval_data")) and (
            is_ckpt if cfg.eval_every is None else (done % cfg.eval_every == 0 or done == cfg.steps))
        if is_eval:
            # the unwrapped model: a DDP forward may sync buffers, and shares differ in size
            metrics.update(_evaluate(hf_student, teacher, eval_rows, cfg, vocab, pad, eos, device, world, autocast_dtype,
                                     tokenizer, config))
            model.train()
            crit = cfg.best_metric
            if crit and crit[0] in metrics:
                better = best is None or (metrics[crit[0]] < best["value"] if crit[1] == "min"
                                          else metrics[crit[0]] > best["value"])
                if better:
                    best = {"value": metrics[crit[0]], "step": done}
        if best is not None:
            metrics["best_step"], metrics["best_value"] = best["step"], best["value"]
        if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps or is_eval):
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                             if k.startswith(("loss", "eval_")) and isinstance(v, float))
            log(f"step {done}/{cfg.steps} {shown} tok/s={metrics['tokens_per_s']:.0f} "
                f"student_tokens={metrics['student_tokens']} teacher_tokens={metrics['teacher_tokens']}")
        history.append(metrics)
        if is_ckpt and (in_ray or config.get("run_dir")):
            _checkpoint(config, in_ray, rank, hf_student, optimizer, scheduler, engine, done, totals, best, metrics)
        elif in_ray and is_eval:
            ray.train.report(metrics)
    if not metrics and start >= cfg.steps:  # a finished run started again: report its last state
        metrics = {"step": start, **{k: int(v) for k, v in totals.items()}}
        if in_ray:
            _checkpoint(config, in_ray, rank, hf_student, optimizer, scheduler, engine, start, totals, best, metrics)
    metrics["wall_s"] = time.time() - t_run
    return {**metrics, "history": history}


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

_STATE = "state.pt"
_MODEL = "model"


def _save_state(d: Path, hf_student: Any, optimizer: Any, scheduler: Any, step: int, totals: dict,
                best: dict | None, with_optimizer: bool) -> None:
    import torch

    hf_student.save_pretrained(d / _MODEL, safe_serialization=True)
    state = {"step": step, "totals": totals, "best": best, "torch_rng": torch.get_rng_state()}
    if with_optimizer:
        state["optimizer"] = optimizer.state_dict()
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, d / _STATE)


def _load_state(d: Path, hf_student: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    model_dir = d / _MODEL
    files = sorted(model_dir.glob("*.safetensors"))
    if not files or not (d / _STATE).is_file():
        raise CheckpointError(f"checkpoint {d} lacks {_MODEL}/*.safetensors or {_STATE}")
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
    state = torch.load(d / _STATE, weights_only=True, map_location="cpu")
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state


class _Dir:
    """Context manager yielding a local checkpoint directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc: Any) -> None:
        return None


def _latest_checkpoint(config: dict[str, Any], in_ray: bool) -> Any:
    """A context manager giving the directory to resume from, or None."""
    if in_ray:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt is not None else None
    run_dir = config.get("run_dir")
    if not run_dir:
        return None
    found = sorted(Path(run_dir, "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    found = [p for p in found if (p / _STATE).is_file()]
    return _Dir(found[-1]) if found else None


def _checkpoint(config: dict[str, Any], in_ray: bool, rank: int, hf_student: Any, optimizer: Any, scheduler: Any,
                engine: Any, step: int, totals: dict, best: dict | None, metrics: dict) -> None:
    """Save model, optimiser, scheduler, step and counters; report them to Ray Train."""
    # ZeRO-1/2 keep whole parameters on every rank: rank 0 saves them (DeepSpeed's sharded
    # optimiser moments are not saved; a resumed DeepSpeed run restarts them)
    if rank == 0:
        tmp = Path(tempfile.mkdtemp(prefix="cbd_ckpt_"))
        _save_state(tmp, hf_student, optimizer, scheduler, step, totals, best, with_optimizer=engine is None)
    if in_ray:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(tmp)) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    elif config.get("run_dir"):
        final = Path(config["run_dir"]) / "checkpoints" / f"step_{step}"
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        shutil.move(str(tmp), final)
        (final / "metrics.json").write_text(json.dumps(metrics, default=float))
    else:
        shutil.rmtree(tmp, ignore_errors=True)


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
    from cbd_ray.schema import config_hash
    from cbd_ray.storage import dir_checksums, file_sha256

    if isinstance(x, dict):
        return config_hash([x["checksums"], x.get("file")])
    p = Path(x)
    return file_sha256(p) if p.is_file() else config_hash(dir_checksums(p))


def run_key(cfg: "DistillConfig", teacher: Any, student: Any, data: Any, eval_data: Any, lm_data: Any) -> str:
    """A hash of the settings and inputs of a Ray Train run: a run whose settings or inputs
    changed gets another key, so it never resumes another run's checkpoints."""
    from cbd_ray.schema import config_hash

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
    ``cfg.select_best_by`` on ``eval_data``, else the last), ``out``, ``wall_s`` and
    ``restarts``.
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
    key = run_key(cfg, teacher_dir if cfg.needs_teacher else None, student_dir, data, eval_data, lm_data)
    _local_device_check(cfg)
    connect_ray()
    import ray

    from cbd_ray import devices

    spec, why = devices.plan(cfg.device, ray.cluster_resources())
    say(f"[distill] {why}")
    check_cluster(cfg, spec.ray_resource)
    result, run_name, restarts = _fit(cfg, spec, records, s_dir, key, name, storage_path, out, max_failures, {
        "teacher_dir": worker_ref(teacher_dir if cfg.needs_teacher else student_dir),
        "student_dir": worker_ref(student_dir), "lm_data": worker_ref(lm_data) if lm_data else None,
        "eval_data": worker_ref(eval_data) if eval_data is not None else None}, say)
    chosen, metrics = _choose(result, cfg, eval_data is not None, run_name)
    metrics.update({"out": str(out), "wall_s": time.time() - t0, "objective": cfg.objective, "workers": cfg.workers,
                    "device": spec.kind, "restarts": restarts, "run_key": key})
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


def _driver_checks(teacher_dir: Any, student_dir: Any, data: Any, cfg: DistillConfig, eval_data: Any,
                   lm_data: Any) -> tuple[Path, Path, Any, int | None, list[dict]]:
    """Everything checkable on the driver, before Ray: models, vocabularies, data lines."""
    from transformers import AutoConfig

    from cbd_ray.data import check_vocab, read_instructions

    s_dir = _check_model_dir(driver_path(student_dir), "student")
    t_dir = _check_model_dir(driver_path(teacher_dir), "teacher") if cfg.needs_teacher else s_dir
    lm = lm_data or cfg.lm_data
    if lm and uses_lm_text(cfg) and not driver_path(lm).is_file():
        raise FileNotFoundError(f"lm_data {ref_label(lm)!r} not found")
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
         storage_path: Any, out: Path, max_failures: int, refs: dict[str, Any], say: Any) -> tuple[Any, str, int]:
    """Tokenise with Ray Data actors, then one TorchTrainer run; (result, run name, restarts)."""
    import pyarrow.compute as pc
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cbd_ray.data import tokenize_dataset
    from cbd_ray.storage import filesystem, is_remote

    items = [{**r, "idx": i} for i, r in enumerate(records)]
    ds = tokenize_dataset(ray.data.from_items(items), refs["student_dir"], cfg.max_len, actors=cfg.data_actors,
                          on_overflow=cfg.on_overflow, with_response=cfg.needs_responses)
    # tokenise now, before the training workers take the CPUs the tokenizer actors need
    table = records_table(ds.materialize())
    # counted here, from the table the shards are cut from (a Dataset.sum is one more Ray Data
    # execution: ~4 s a stage on 2 cores)
    cut = int(pc.sum(table["truncated"]).as_py() or 0)
    if cut:
        say(f"[distill] truncated {cut} of {len(records)} records to max_len={cfg.max_len} tokens")
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
        train_loop_config={"cfg": cfg.model_dump(), **refs, "data": None, "ray_data": {"data": True},
                           "vocab": None, "run_dir": None if is_remote(root) else str(Path(fs_path) / run_name),
                           "ray": True, "device_kind": spec.kind, "starts": starts},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=spec.kind == "cuda",
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend=spec.backend),
        run_config=RunConfig(
            name=run_name, storage_path=fs_path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(checkpoint_score_attribute=crit[0] if crit else None,
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
        raise result.error
    return result, run_name, restarts


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
    # one entry per step: a finished run started again re-reports its last step
    by_step = {m.get("step", 0): {k: v for k, v in m.items() if k in ("step", "loss") or k.startswith("eval_")}
               for _, m in result.best_checkpoints}
    metrics["checkpoints"] = [by_step[k] for k in sorted(by_step)]
    if crit is not None and crit[0] in chosen_metrics:
        metrics[f"selected_{crit[0]}"] = chosen_metrics[crit[0]]
    return chosen, metrics

"""The memory plan of one training stage, made before any work (DESIGN decision 15).

:func:`plan_distill` predicts the peak memory of one Ray Train worker of a distillation run
(``cbd_ray.train``) from the two models' shapes and the run's settings, part by part:

resident for the whole run
    ``weights``     the student's float32 master weights (bf16 when DeepSpeed runs in bf16)
    ``gradients``   the student's gradients (ZeRO-2 shards them; DDP adds its buckets); with
                    one backward per optimiser step and no DeepSpeed they exist only from the
                    backward on, so they count in the step phase instead
    ``optimizer``   AdamW: two float32 moments; DeepSpeed in bf16 adds a float32 master copy
                    and a float32 gradient partition; ZeRO-1/2 shard them over the world
    ``teacher``     the frozen teacher (bf16 on accelerators, float32 on CPU), never sharded
    ``rollout``     MiniLLM's stored rollouts (every micro-batch of a step: teacher hidden
                    rows, log-probs, advantages), kept for ``ppo_epochs`` steps
    ``overhead``    CUDA context, NCCL, allocator slack, DeepSpeed's reduce/all-gather buckets
                    (on CPU: the worker process itself — Python, torch, transformers, Ray — and
                    the freed memory glibc's heap keeps resident, 0.9-1.6 GiB measured)
one of three phases, whichever is largest
    graph phase     ``activations`` (the saved tensors of the student's forward, see
                    :func:`layer_bytes`, plus the backward pass's transient gradients),
                    ``autocast_weights`` (bf16 copies of every weight that autocast makes and
                    the graph keeps for backward) and ``loss`` (the loss head's buffers: counted
                    hidden rows, the teacher's final hidden states, the fused KD gradients, the
                    ``kd_chunk_bytes`` chunk of ``[rows, V]`` float32 logits buffers)
    sampling phase  ``kv_cache``: the static KV caches of the sampling models
                    (2·layers·kv_heads·head_dim·max_len·rows elements each) and the prefill
    step phase      ``step``: AdamW's temporaries while the activations are gone (foreach on
                    accelerators: one float32 copy of the optimised parameters; on CPU one
                    tensor at a time)

``total`` = the resident parts + the largest phase. MiniLLM back-propagates its policy term
before it builds the pretraining graph, so its graph phase is the larger of the two graphs,
not their sum. Rollouts and the pretraining blocks are ``max_len`` tokens; data rows are
planned at ``max_len`` too (the worst case of right padding).

The activation model (:func:`layer_bytes`) lists the tensors each module of the family's
Hugging Face implementation saves for backward (transformers 5, torch 2.13, the default SDPA
attention, a padding mask present, train mode). It was checked tensor by tensor against
``torch.autograd.graph.saved_tensors_hooks`` on CPU for every family (exact in float32;
``tests/distillation/test_memplan.py`` keeps the check) and against the process's resident memory
(``bench/memory_plan.py``, docs/benchmarks.md). The accelerator model (bf16 autocast, fused
flash/memory-efficient attention, bool dropout masks) follows from the same list with the
dtypes changed; it has not been measured on a GPU here.

Pure Python: no torch import. Shapes come from ``transformers`` config objects
(``AutoConfig``) or the project's shape dicts (``ShapeSpec``: layers, hidden, heads, kv_heads,
ffn, head_dim, vocab_size, with ``family``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from cbd_ray.errors import CBDError

GiB = 2 ** 30
FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "qwen3")
DEFAULT_MARGIN = 0.10
#: [rows, V] float32 buffers alive per loss chunk (cbd_ray.losses.LIVE_FUSED / LIVE_AUTOGRAD and
#: the ``live=`` of cbd_ray.objectives' CE and policy terms); mirrored here to keep torch out
LIVE_FUSED, LIVE_AUTOGRAD, LIVE_CE, LIVE_POLICY = 6, 10, 3, 6
#: DeepSpeed's default reduce_bucket_size and allgather_bucket_size (elements)
DS_BUCKET = 500_000_000
ACCEL_OVERHEAD = 2 * GiB      # CUDA/NPU context + kernels, NCCL/HCCL buffers, allocator slack
CPU_PROCESS = 1 * GiB         # a CPU worker process: Python, torch, transformers, Ray
CPU_ALLOCATOR = 5 * GiB // 4  # freed memory glibc's heap keeps (0.9-1.6 GiB measured: bench/memory_plan.py)
CPU_OVERHEAD = CPU_PROCESS + CPU_ALLOCATOR
RESIDENT = ("weights", "gradients", "optimizer", "teacher", "rollout", "overhead")
PHASES = {"graph": ("activations", "autocast_weights", "loss"), "sampling": ("kv_cache",), "step": ("step",)}
#: the defaults of each family's config class where a shape dict does not say
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"tied": True, "positions": 1024, "attn_dropout": 0.1, "hidden_dropout": 0.1, "embd_dropout": 0.1},
    "gpt_neox": {"parallel_residual": True, "rotary": 0.25},
    "llama": {}, "qwen2": {}, "qwen3": {},
}


# ---------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of one model. ``head_dim`` may differ from hidden / heads (Qwen3);
    ``kv_heads`` < ``heads`` is grouped-query attention; dropout probabilities are the
    config's (they decide which attention kernel runs on CPU and which masks are saved)."""

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = False
    positions: int = 0            # learned absolute position rows (GPT-2's wpe)
    attn_dropout: float = 0.0
    hidden_dropout: float = 0.0   # residual-branch dropout (GPT-2 resid_pdrop, GPT-NeoX hidden_dropout)
    embd_dropout: float = 0.0
    parallel_residual: bool = False
    rotary_dim: int = 0           # rotated dims per head (cos/sin tables, shared by the layers)

    @property
    def params(self) -> int:
        """Parameter count (tied LM head counted once; biases and norms included)."""
        h, f, L = self.hidden, self.ffn, self.layers
        qd, kd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        emb = self.vocab * h + self.positions * h + (0 if self.tied else self.vocab * h)
        if self.family == "gpt2":
            layer = 4 * h + (h * 3 * qd + 3 * qd) + (qd * h + h) + (h * f + f) + (f * h + h)
        elif self.family == "gpt_neox":
            layer = 4 * h + (h * 3 * qd + 3 * qd) + (qd * h + h) + (h * f + f) + (f * h + h)
        else:
            bias = qd + 2 * kd if self.family == "qwen2" else 0
            qk_norm = 2 * self.head_dim if self.family == "qwen3" else 0
            layer = 2 * h + h * (qd + 2 * kd) + bias + qd * h + 3 * h * f + qk_norm
        return emb + L * layer + (2 * h if self.family in ("gpt2", "gpt_neox") else h)  # final norm

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest parameter tensor (an embedding, or a fused projection)."""
        qd = self.heads * self.head_dim
        return max(self.vocab * self.hidden, self.positions * self.hidden, self.hidden * 3 * qd, self.hidden * self.ffn)

    def label(self) -> str:
        kv = f"/kv{self.kv_heads}" if self.kv_heads != self.heads else ""
        return f"{self.family} {self.layers}x{self.hidden}x{self.heads}{kv}"


def _hf_shape(c: Any) -> ModelShape:
    """A ModelShape from a transformers config object (the attribute names of each family)."""
    fam = getattr(c, "model_type", None)
    if fam == "gpt2":
        h, a = int(c.n_embd), int(c.n_head)
        return ModelShape("gpt2", int(c.n_layer), h, a, a, h // a, int(c.n_inner or 4 * h), int(c.vocab_size),
                          tied=bool(getattr(c, "tie_word_embeddings", True)), positions=int(c.n_positions),
                          attn_dropout=float(c.attn_pdrop), hidden_dropout=float(c.resid_pdrop),
                          embd_dropout=float(c.embd_pdrop))
    h, a = int(c.hidden_size), int(c.num_attention_heads)
    if fam == "gpt_neox":
        rope = getattr(c, "rope_parameters", None) or {}
        pct = float(rope.get("partial_rotary_factor", getattr(c, "rotary_pct", 0.25)))
        return ModelShape("gpt_neox", int(c.num_hidden_layers), h, a, a, h // a, int(c.intermediate_size),
                          int(c.vocab_size), tied=bool(getattr(c, "tie_word_embeddings", False)),
                          attn_dropout=float(getattr(c, "attention_dropout", 0.0)),
                          hidden_dropout=float(getattr(c, "hidden_dropout", 0.0)),
                          embd_dropout=float(getattr(c, "hidden_dropout", 0.0)),
                          parallel_residual=bool(getattr(c, "use_parallel_residual", True)),
                          rotary_dim=int(h // a * pct))
    if fam in ("llama", "qwen2", "qwen3"):
        hd = int(getattr(c, "head_dim", None) or h // a)
        return ModelShape(fam, int(c.num_hidden_layers), h, a, int(getattr(c, "num_key_value_heads", None) or a), hd,
                          int(c.intermediate_size), int(c.vocab_size),
                          tied=bool(getattr(c, "tie_word_embeddings", False)),
                          attn_dropout=float(getattr(c, "attention_dropout", 0.0)), rotary_dim=hd)
    raise CBDError(f"model type {fam!r} has no memory model; supported: {', '.join(FAMILIES)}")


def model_shape(config: Any, family: str | None = None) -> ModelShape:
    """The :class:`ModelShape` of ``config``: a ModelShape, a transformers config object
    (``AutoConfig.from_pretrained(dir)``), or a shape mapping / ``ShapeSpec`` (layers, hidden,
    heads, and optionally kv_heads, ffn, head_dim, vocab_size, tied, positions) whose family is
    ``family`` or the mapping's ``family`` key. Unknown dropouts take the family's defaults."""
    if isinstance(config, ModelShape):
        return config
    if hasattr(config, "model_dump"):
        config = config.model_dump()
    if not isinstance(config, Mapping):
        return _hf_shape(config)
    fam = family or config.get("family")
    if fam not in FAMILIES:
        raise CBDError(f"a shape needs its family (one of {', '.join(FAMILIES)}), got {fam!r}")
    d = {**_FAMILY_DEFAULTS[fam], **{k: v for k, v in config.items() if v is not None}}
    h, a = int(d["hidden"]), int(d["heads"])
    hd = int(d.get("head_dim") or h // a)
    vocab = int(d.get("vocab_size") or d.get("vocab") or 0)
    if not vocab:
        raise CBDError(f"the {fam} shape {d['layers']}x{h}x{a} has no vocab_size; the plan needs it")
    return ModelShape(fam, int(d["layers"]), h, a, int(d.get("kv_heads") or a), hd, int(d.get("ffn") or 4 * h), vocab,
                      tied=bool(d.get("tied", False)), positions=int(d.get("positions", 0)),
                      attn_dropout=float(d.get("attn_dropout", 0.0)),
                      hidden_dropout=float(d.get("hidden_dropout", 0.0)),
                      embd_dropout=float(d.get("embd_dropout", 0.0)),
                      parallel_residual=bool(d.get("parallel_residual", False)),
                      rotary_dim=int(hd * float(d.get("rotary", 1.0))) if fam != "gpt2" else 0)


# ---------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Precision:
    """How a device runs the models. On an accelerator the student's matmuls run under bf16
    autocast (its master weights and the residual stream stay float32), the teacher is bf16,
    attention is a fused kernel (flash / memory-efficient: no T×T probabilities kept, even
    with dropout) and dropout saves a bool mask. On CPU everything is float32, dropout saves a
    float32 noise tensor, and SDPA falls back to the math kernel (T×T probabilities kept) when
    attention dropout is on."""

    accelerator: bool
    compute: int    # bytes of an activation element that feeds a matmul (2 bf16, 4 float32)
    mask: int       # bytes of a dropout-mask element
    teacher: int    # bytes of a teacher weight / activation element

    def fused_attention(self, shape: ModelShape, train: bool = True) -> bool:
        return self.accelerator or not (train and shape.attn_dropout > 0)


def precision(device: str) -> Precision:
    """The :class:`Precision` of ``device``: "cuda", "npu" or "auto" (an accelerator), "cpu"."""
    if device not in ("cuda", "npu", "auto", "cpu"):
        raise CBDError(f"device {device!r} is not one of cuda, npu, auto, cpu")
    if device == "cpu":
        return Precision(False, 4, 4, 4)
    return Precision(True, 2, 1, 2)


# ---------------------------------------------------------------------------- activations


def _attention_bytes(s: ModelShape, seq: int, p: Precision, train: bool = True) -> float:
    """Bytes per token one attention block's SDPA call saves. Fused kernels keep q, k, v (k, v
    repeated to every head: a padded batch carries a mask, which rules out SDPA's own GQA),
    the output, the float32 log-sum-exp per head and a float copy of the ``[B, 1, T, T]``
    mask. The math kernel keeps scaled copies of q, k, v, the softmax output, the dropout
    noise and the dropped probabilities (each ``[B, heads, T, T]``), and a copy of the output
    for the output projection."""
    c, qd = p.compute, s.heads * s.head_dim
    if p.fused_attention(s, train):
        out = 3 * c * qd + c * qd + 4 * s.heads + c * seq
        if s.family == "gpt_neox":  # v stays a view of the fused [T, 3·hidden] output; rotary makes new q, k;
            out += 3 * c * s.hidden  # the dense projection reads a contiguous copy of the output
        return out
    probs = 3 if s.attn_dropout > 0 and train else 1
    return 3 * c * qd + probs * c * s.heads * seq + c * qd


def layer_bytes(s: ModelShape, seq: int, p: Precision, train: bool = True) -> float:
    """Bytes per token that one decoder layer saves for backward (``seq`` tokens per row).

    Per token, with c the compute bytes (4 float32, 2 bf16), x = 4 the float32 residual
    stream, m the dropout-mask bytes, h hidden, f ffn, A the attention term
    (:func:`_attention_bytes`):

    * GPT-2: LayerNorm ×2 (input x·h, mean and rstd 8), the inputs of c_attn and c_fc (c·h
      each), A (c_proj reads SDPA's output in place), GELU-tanh written out in Python (its
      input, tanh, 0.5·x and 1+tanh: 4·c·f) plus c_proj's input (c·f), two residual dropout
      masks (m·h each): 2(x·h+8) + 2c·h + A + 5c·f + 2m·h. E.g. float32 on CPU with
      dropout: 40h + 20f + 12·heads·T + 16.
    * GPT-NeoX (parallel residual): one LayerNorm input (x·h+8) and the second's statistics
      (8), the inputs of query_key_value and dense_h_to_4h (c·h each), A, GELU's input and
      dense_4h_to_h's input (2c·f), dropout masks when hidden_dropout > 0.
    * Llama / Qwen2 / Qwen3: RMSNorm written out in Python ×2 (float32 input, rsqrt,
      normalised: 2x·h+4 each), the inputs of q/k/v and gate/up (c·h each), A (o_proj reads
      SDPA's output in place), SiLU's input, its output, up's output and their product
      (4c·f). Qwen3 adds RMSNorm of q and k per head (float32 input and normalised, plus a
      bf16 copy under autocast, and rsqrt per head).
    """
    c, x, h, f = p.compute, 4, s.hidden, s.ffn
    attn = _attention_bytes(s, seq, p, train)
    drop = 2 * p.mask * h if (train and s.hidden_dropout > 0) else 0
    if s.family == "gpt2":
        return 2 * (x * h + 8) + 2 * c * h + attn + 5 * c * f + drop
    if s.family == "gpt_neox":
        ln2 = 8 if s.parallel_residual else x * h + 8
        return (x * h + 8) + ln2 + 2 * c * h + attn + 2 * c * f + drop
    out = 2 * (2 * x * h + 4) + 2 * c * h + attn + 4 * c * f
    if s.family == "qwen3":
        qd, kd = s.heads * s.head_dim, s.kv_heads * s.head_dim
        out += (2 * x + (c if c < 4 else 0)) * (qd + kd) + 4 * (s.heads + s.kv_heads)
    return out


def base_bytes(s: ModelShape, p: Precision, train: bool = True) -> float:
    """Bytes per token the model saves outside its layers: the token (and GPT-2 position)
    ids, the embedding dropout mask, the final norm and its float32 output (the hidden
    states the loss head reads), rotary cos/sin tables."""
    ids = 16 if s.family == "gpt2" else 8
    drop = p.mask * s.hidden if (train and s.embd_dropout > 0) else 0
    norm = 4 * s.hidden + 8 if s.family in ("gpt2", "gpt_neox") else 8 * s.hidden + 4
    return ids + drop + norm + 4 * s.hidden + 8 * s.rotary_dim


def backward_transient(s: ModelShape, seq: int, p: Precision, train: bool = True) -> float:
    """Bytes per token alive on top of the saved tensors while backward runs through a layer:
    the float32 gradient of the residual stream (in and out) and the gradients of the widest
    intermediate and of its input."""
    wide = s.ffn
    if not p.fused_attention(s, train):
        wide = max(wide, s.heads * seq)
    return 2 * 4 * s.hidden + 2 * p.compute * wide


def graph_bytes(s: ModelShape, rows: int, seq: int, p: Precision, checkpointing: bool = False) -> int:
    """Peak bytes of one student forward with gradients over ``rows × seq`` tokens, through its
    backward: the saved tensors of every layer (with gradient checkpointing: each layer's
    float32 input, plus one layer recomputed in backward), the model's own, and the backward
    transient."""
    per_layer = layer_bytes(s, seq, p)
    kept = s.layers * 4 * s.hidden + per_layer if checkpointing else s.layers * per_layer
    return int(rows * seq * (kept + base_bytes(s, p) + backward_transient(s, seq, p)))


def forward_bytes(s: ModelShape, rows: int, seq: int, dtype_bytes: int) -> int:
    """Peak transient bytes of a forward without gradients (the teacher's, a prefill): the
    residual stream in and out, a layer's widest intermediate and its input."""
    return int(rows * seq * dtype_bytes * (3 * s.hidden + 2 * max(s.ffn, 3 * s.heads * s.head_dim)))


def kv_cache_bytes(s: ModelShape, rows: int, seq: int, dtype_bytes: int) -> int:
    """A static KV cache: 2 (k and v) · layers · kv_heads · head_dim · seq · rows elements."""
    return 2 * s.layers * s.kv_heads * s.head_dim * seq * rows * dtype_bytes


# ---------------------------------------------------------------------------- weights and optimiser


def state_bytes(params: int, world: int, p: Precision, deepspeed: int | None,
                largest: int | None = None) -> dict[str, int]:
    """Bytes of the student's training state under AdamW for ``params`` parameters.

    Without DeepSpeed: float32 weights (the master copy), float32 gradients (DDP keeps a
    second copy in its buckets when world > 1), two float32 moments; under autocast the graph
    holds bf16 copies of the weights (``autocast_weights``). With DeepSpeed on an accelerator
    the engine runs in bf16: bf16 weights and gradients, and the optimiser holds a float32
    master copy, a float32 gradient partition and the moments (16 bytes a parameter), sharded
    over the world by ZeRO-1/2; ZeRO-2 also shards the gradients. On CPU (no bf16) the engine
    keeps float32 weights and gradients. ``step`` is AdamW's temporary: on an accelerator
    the foreach implementation makes one float32 copy of every parameter it updates at once;
    on CPU torch steps one tensor at a time (``largest``: the largest tensor's elements).
    ``buckets`` are DeepSpeed's reduce and all-gather buckets."""
    if deepspeed is None:
        return {"weights": 4 * params, "gradients": 4 * params * (2 if world > 1 else 1),
                "optimizer": 8 * params, "step": 4 * (params if p.accelerator else min(params, largest or params)),
                "autocast_weights": 2 * params if p.accelerator else 0, "buckets": 0}
    shards = world if deepspeed >= 1 else 1
    wb = 2 if p.accelerator else 4
    opt = 16 * params if (deepspeed >= 1 or p.accelerator) else 8 * params
    return {"weights": wb * params, "gradients": wb * params // (world if deepspeed >= 2 else 1),
            "optimizer": opt // shards, "step": 4 * params // shards, "autocast_weights": 0,
            "buckets": 2 * min(DS_BUCKET, params) * wb if deepspeed >= 1 else 0}


# ---------------------------------------------------------------------------- loss heads


def chunk_bytes(cfg: Any, vocab: int, live: int, tokens: int | None = None) -> int:
    """The ``live`` float32 ``[rows, vocab]`` buffers of one loss chunk: ``cfg.chunk_size`` rows,
    else as many as fit ``cfg.kd_chunk_bytes`` (cbd_ray.losses.rows_for_budget); never more
    rows than the ``tokens`` counted."""
    rows = cfg.chunk_size or max(1, cfg.kd_chunk_bytes // (4 * vocab * live))
    if tokens is not None:
        rows = min(rows, tokens)
    return int(rows) * vocab * 4 * live


def ce_bytes(cfg: Any, s: ModelShape, tokens: int, vocab: int) -> int:
    """Cross-entropy on counted rows (objectives.ce_on): the float32 ``[N, H]`` gather of the
    counted hidden rows and its indices, and one checkpointed chunk's logits buffers."""
    return tokens * (4 * s.hidden + 16) + chunk_bytes(cfg, vocab, LIVE_CE, tokens)


def kd_bytes(cfg: Any, s: ModelShape, t: ModelShape, tokens: int, vocab: int, p: Precision,
             divergence: str | None = None) -> int:
    """Token-level KD from hidden states (losses.kd_loss_from_hidden, fused path): the
    teacher's final hidden states (and their float32 copy when the teacher is bf16), the
    float32 gathers of the counted rows of both, the gradients the fused path saves
    (``[N, Hs]`` rows and the ``[V, Hs]`` head), the bf16 cast of the student head under
    autocast, and one chunk's logits buffers."""
    ht = t.hidden
    hidden = tokens * ht * p.teacher + (tokens * ht * 4 if p.teacher != 4 else 0)
    rows = tokens * (4 * s.hidden + 4 * ht + 16)
    saved = tokens * 4 * s.hidden + 4 * s.vocab * s.hidden
    cast = s.vocab * s.hidden * p.compute if p.compute != 4 else 0
    live = LIVE_FUSED if (divergence or cfg.divergence) in ("fkl", "rkl") else LIVE_AUTOGRAD
    return hidden + rows + saved + cast + chunk_bytes(cfg, vocab, live, tokens)


def _shared_vocab(s: ModelShape, t: ModelShape | None) -> int:
    return min(s.vocab, t.vocab) if t is not None else s.vocab


def _loss_bytes(cfg: Any, s: ModelShape, t: ModelShape | None, rows: int, p: Precision, pretraining: bool) -> int:
    """The loss head's buffers of the graph phase. MiniLLM: the larger of the policy term
    (counted hidden rows, checkpointed chunks) and the pretraining term (CE and forward KD on
    ``rows`` blocks of max_len, the teacher's forward running beside the student's graph):
    the policy term is back-propagated before the pretraining graph is built."""
    n, v = rows * cfg.max_len, _shared_vocab(s, t)
    if cfg.objective in ("sft", "seqkd") or t is None:
        return ce_bytes(cfg, s, n, v)
    if cfg.objective in ("kd", "on_policy"):
        return kd_bytes(cfg, s, t, n, v, p)
    policy = n * (4 * s.hidden + 16) + chunk_bytes(cfg, v, LIVE_POLICY, n)
    if not pretraining:
        return policy
    pt = ce_bytes(cfg, s, n, v) + forward_bytes(t, rows, cfg.max_len, p.teacher)
    if cfg.kd_ratio:
        pt += kd_bytes(cfg, s, t, n, v, p, divergence="fkl")
    return max(policy, pt)


def _sampling_bytes(cfg: Any, s: ModelShape, t: ModelShape | None, rows: int, p: Precision) -> int:
    """The sampling phase: static KV caches of ``rows × max_len`` for each model that samples
    (the student in its autocast dtype, the teacher in its own) and the largest prefill."""
    models: list[tuple[ModelShape, int]] = []
    if cfg.objective in ("on_policy", "minillm"):
        models.append((s, p.compute))
    teacher_samples = (cfg.objective == "minillm" and cfg.teacher_mix > 0) or (
        cfg.objective == "seqkd" and cfg.seqkd_source == "teacher")
    if teacher_samples and t is not None:
        models.append((t, p.teacher))
    if not models:
        return 0
    caches = sum(kv_cache_bytes(m, rows, cfg.max_len, b) for m, b in models)
    return caches + max(forward_bytes(m, rows, cfg.max_len, b) for m, b in models)


def rollout_bytes(cfg: Any, t: ModelShape | None) -> int:
    """MiniLLM's stored rollouts, one per micro-batch of the worker's share: the teacher's
    float32 hidden rows (``[N, Ht]``), token ids and masks, log-probs, ratios, advantages."""
    if cfg.objective != "minillm" or t is None:
        return 0
    return cfg.per_worker * cfg.max_len * (4 * t.hidden + 48)


# ---------------------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    """Predicted bytes of one worker of one training stage, by part (module docstring).
    ``total`` is the resident parts plus the largest phase, not the sum of all parts."""

    stage: str
    parts: dict[str, int]
    micro: int
    per_worker: int
    world: int
    device: str
    about: dict[str, str] = field(default_factory=dict)  # labels for the table
    resident_parts: tuple[str, ...] = RESIDENT
    phase_parts: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(PHASES))

    def phase_bytes(self) -> dict[str, int]:
        """Bytes of each phase (graph, sampling, step)."""
        return {name: sum(self.parts.get(k, 0) for k in keys) for name, keys in self.phase_parts.items()}

    @property
    def phase(self) -> str:
        """The phase that sets the peak."""
        ph = self.phase_bytes()
        return max(ph, key=lambda k: ph[k])

    @property
    def resident(self) -> int:
        return sum(self.parts.get(k, 0) for k in self.resident_parts)

    @property
    def total(self) -> int:
        return self.resident + max(self.phase_bytes().values())

    def fits(self, device_bytes: int | float, margin: float = DEFAULT_MARGIN) -> bool:
        """Whether the peak stays under ``device_bytes`` less ``margin`` (a fraction) of it."""
        return self.total <= device_bytes * (1.0 - margin)

    def largest(self, n: int = 3) -> str:
        """The ``n`` largest parts, e.g. "activations 47.5, weights 2.9, optimizer 1.4 GiB"."""
        top = sorted(((v, k) for k, v in self.parts.items() if v), reverse=True)[:n]
        return ", ".join(f"{k} {v / GiB:.1f}" for v, k in top) + " GiB"

    def table(self, device_bytes: int | float | None = None, margin: float = DEFAULT_MARGIN) -> str:
        """The plan as aligned text: a header, one line per part (GiB, and whether it is
        resident or in which phase; * marks the peak phase), the total and the verdict."""
        lines = [f"stage {self.stage}: " + ", ".join(f"{k} {v}" for k, v in self.about.items())]
        lines.append(f"  micro-batch {self.micro} of {self.per_worker} rows, world {self.world}, {self.device}")
        where = {k: "resident" for k in self.resident_parts}
        peak = self.phase
        for name, keys in self.phase_parts.items():
            where.update({k: name + (" *" if name == peak else "") for k in keys})
        for k, v in self.parts.items():
            lines.append(f"    {k:<17}{v / GiB:>9.2f} GiB  {where.get(k, '')}")
        lines.append(f"    {'total':<17}{self.total / GiB:>9.2f} GiB  "
                     f"(resident {self.resident / GiB:.2f} + {peak} phase)")
        if device_bytes:
            ok = "fits" if self.fits(device_bytes, margin) else "DOES NOT FIT"
            lines.append(f"    {ok} {device_bytes / GiB:.1f} GiB with a {margin:.0%} margin "
                         f"(limit {device_bytes * (1 - margin) / GiB:.2f} GiB)")
        return "\n".join(lines)


def _pretraining(cfg: Any, pretraining: bool | None) -> bool:
    """Whether MiniLLM's pretraining term runs (lm_coef not 0 and text given)."""
    if cfg.objective != "minillm" or cfg.lm_coef == 0:
        return False
    return bool(cfg.lm_data) if pretraining is None else pretraining


def plan_distill(cfg: Any, teacher_config: Any, student_config: Any, world: int, device: str = "cuda", *,
                 stage: str = "distill", micro: int | None = None, pretraining: bool | None = None) -> MemoryPlan:
    """The memory plan of one worker of a distillation run.

    cfg: a :class:`cbd_ray.train.DistillConfig` (objective, batch_size / workers, micro_batch,
    max_len, gradient_checkpointing, deepspeed, kd_chunk_bytes / chunk_size, MiniLLM settings).
    teacher_config / student_config: anything :func:`model_shape` takes (a transformers
    config, a shape mapping with ``family``); the teacher may be None when the objective does
    not run one. world: the number of workers (ZeRO shards over it). device: "cuda"/"npu"/"auto"
    (bf16 autocast) or "cpu" (float32). micro: the micro-batch rows to plan (default: the
    config's; "auto" is resolved from ``cfg.device_memory_gib`` when set, else the whole
    share). pretraining: whether MiniLLM's pretraining term runs (default: ``cfg.lm_data`` is
    set and ``lm_coef`` is not 0).
    """
    p = precision(device)
    s = model_shape(student_config)
    needs_teacher = cfg.objective in ("kd", "on_policy", "minillm") or (
        cfg.objective == "seqkd" and cfg.seqkd_source == "teacher")
    t = model_shape(teacher_config) if (needs_teacher and teacher_config is not None) else None
    rows = micro or _planned_micro(cfg, teacher_config, student_config, world, device, stage, pretraining)
    state = state_bytes(s.params, world, p, cfg.deepspeed, s.largest_tensor)
    lm = _pretraining(cfg, pretraining)
    parts = {
        "weights": state["weights"], "gradients": state["gradients"], "optimizer": state["optimizer"],
        "teacher": t.params * p.teacher if t is not None else 0, "rollout": rollout_bytes(cfg, t),
        "overhead": (ACCEL_OVERHEAD if p.accelerator else CPU_OVERHEAD) + state["buckets"],
        "activations": graph_bytes(s, rows, cfg.max_len, p, cfg.gradient_checkpointing),
        "autocast_weights": state["autocast_weights"], "loss": _loss_bytes(cfg, s, t, rows, p, lm),
        "kv_cache": _sampling_bytes(cfg, s, t, rows, p), "step": state["step"],
    }
    zero = "off" if cfg.deepspeed is None else f"ZeRO-{cfg.deepspeed}"
    about = {"objective": cfg.objective + (" + pretraining" if lm else ""),
             "student": f"{s.label()} ({s.params / 1e6:,.1f}M)",
             "teacher": f"{t.label()} ({t.params / 1e6:,.1f}M)" if t is not None else "none",
             "seq": str(cfg.max_len), "checkpointing": "on" if cfg.gradient_checkpointing else "off", "deepspeed": zero}
    dev = f"{device} ({'bf16 autocast' if p.accelerator else 'float32'})"
    plan = MemoryPlan(stage, parts, rows, cfg.per_worker, world, dev, about)
    if cfg.deepspeed is None and rows == cfg.per_worker and not lm:
        # one backward per optimiser step: no gradient exists when the graph is built (they are
        # set to None after each step); backward makes them as it frees the activations, the LM
        # head's (the largest tensor, tied to the embedding in GPT-2) first
        parts["activations"] += 4 * s.largest_tensor
        plan.resident_parts = tuple(k for k in RESIDENT if k != "gradients")
        plan.phase_parts["step"] = ("gradients", "step")
    return plan


def _planned_micro(cfg: Any, teacher_config: Any, student_config: Any, world: int, device: str, stage: str,
                   pretraining: bool | None) -> int:
    """The micro-batch rows a config plans: its own; for "auto" the resolved one when the
    device memory is known, else the whole share."""
    m = cfg.micro_batch
    if m == "auto":
        if cfg.device_memory_gib:
            return auto_micro_batch(cfg, teacher_config, student_config, world, device,
                                    cfg.device_memory_gib * GiB, stage=stage, pretraining=pretraining)
        return cfg.per_worker
    return min(int(m), cfg.per_worker) if m else cfg.per_worker


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, largest first (the micro-batch sizes a share allows)."""
    return [d for d in range(n, 0, -1) if n % d == 0]


def auto_micro_batch(cfg: Any, teacher_config: Any, student_config: Any, world: int, device: str,
                     device_bytes: float, *, stage: str = "distill", margin: float = DEFAULT_MARGIN,
                     pretraining: bool | None = None) -> int:
    """The largest micro-batch dividing the worker's share whose plan fits ``device_bytes``
    with ``margin``; a one-line CBDError naming the stage, the smallest plan and what to
    change when none does."""
    plan = None
    for m in divisors(cfg.per_worker):
        plan = plan_distill(cfg, teacher_config, student_config, world, device, stage=stage, micro=m,
                            pretraining=pretraining)
        if plan.fits(device_bytes, margin):
            return m
    raise CBDError(refusal(plan, cfg, device_bytes, margin))


def refusal(plan: MemoryPlan, cfg: Any, device_bytes: float, margin: float = DEFAULT_MARGIN) -> str:
    """One line: the stage, the plan that does not fit, its largest parts, what to change."""
    advice = [f"more workers (now {plan.world}; ZeRO shards optimiser state over them)"
              if cfg.deepspeed else "more workers with deepspeed: 2"]
    if cfg.deepspeed is None or cfg.deepspeed < 2:
        advice.append("deepspeed: 2")
    if not cfg.gradient_checkpointing:
        advice.append("gradient_checkpointing: true")
    if plan.micro > 1:
        advice.append("a smaller micro_batch (or auto)")
    advice.append("a device with more memory (device_memory_gib)")
    return (f"{plan.stage}: micro_batch {plan.micro} needs {plan.total / GiB:.1f} GiB per worker on {plan.device}, "
            f"over {device_bytes / GiB:.1f} GiB less a {margin:.0%} margin ({plan.largest()}); "
            f"use {', '.join(advice)}")


# ---------------------------------------------------------------------------- micro_batch "auto"


def node_memory() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_budget(cfg: Any) -> tuple[str, float, str]:
    """(device to plan for, bytes one worker may use, where that number came from).

    ``device_memory_gib`` when set (device "auto" then plans an accelerator). Otherwise an
    accelerator is asked on this machine (the driver; on a cluster whose driver has no GPU,
    give device_memory_gib), and CPU workers share this node's memory equally (a worker per
    ``workers``, all on this node: the conservative reading of a one-node CPU run)."""
    if cfg.device_memory_gib:
        device = "cuda" if cfg.device == "auto" else cfg.device
        return device, cfg.device_memory_gib * GiB, f"device_memory_gib {cfg.device_memory_gib:g}"
    if cfg.device in ("cuda", "npu"):
        total = _local_accelerator_memory(cfg.device)
        if total is None:
            raise CBDError(f"micro_batch auto on {cfg.device} needs device_memory_gib (the memory of one device in "
                           "GiB): this driver has no such device to ask")
        return cfg.device, total, f"{cfg.device}:0 of this machine"
    return "cpu", node_memory() / cfg.workers, f"this node's memory / {cfg.workers} worker(s)"


def _local_accelerator_memory(kind: str) -> float | None:
    """Total memory of device 0 of ``kind`` when this process can see one (torch imported
    only here, when asked)."""
    try:
        import torch

        if kind == "cuda" and torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 - no accelerator stack: the caller asks for the number
        return None
    return None


def _as_config(model: Any) -> Any:
    """A model directory (or hub name) becomes its transformers config; anything else is
    returned as it is (a config object, a shape mapping)."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(model))
    return model


def resolve_micro_batch(cfg: Any, teacher: Any, student: Any, stage: str = "distill",
                        pretraining: bool | None = None, log: Any = None) -> Any:
    """``cfg`` with ``micro_batch: auto`` replaced by the largest micro-batch that fits
    (:func:`auto_micro_batch`); any other config is returned unchanged. ``teacher`` and
    ``student`` are model directories or configs. Raises CBDError (one line) when even one
    row does not fit."""
    if cfg.micro_batch != "auto":
        return cfg
    device, budget, source = device_budget(cfg)
    t = _as_config(teacher) if cfg.needs_teacher else None
    s = _as_config(student)
    m = auto_micro_batch(cfg, t, s, cfg.workers, device, budget, stage=stage, pretraining=pretraining)
    plan = plan_distill(cfg, t, s, cfg.workers, device, stage=stage, micro=m, pretraining=pretraining)
    if log is not None:
        log(f"[distill] micro_batch auto: {m} of {cfg.per_worker} rows per worker, planned "
            f"{plan.total / GiB:.1f} GiB of {budget / GiB:.1f} GiB ({source})")
    return type(cfg).model_validate({**cfg.model_dump(), "micro_batch": m})


__all__ = [
    "GiB", "FAMILIES", "DEFAULT_MARGIN", "ModelShape", "model_shape", "Precision", "precision", "layer_bytes",
    "base_bytes", "graph_bytes", "forward_bytes", "kv_cache_bytes", "state_bytes", "chunk_bytes", "ce_bytes",
    "kd_bytes", "rollout_bytes", "MemoryPlan", "plan_distill", "divisors", "auto_micro_batch", "refusal",
    "device_budget", "node_memory", "resolve_micro_batch",
]

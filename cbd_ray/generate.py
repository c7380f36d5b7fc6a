"""Fast batched sampling for SeqKD pseudo-labels, on-policy KD and MiniLLM rollouts.

One loop over Hugging Face ``AutoModelForCausalLM`` forward passes with a pre-allocated
``transformers.StaticCache`` (every family the project supports: GPT-2, GPT-NeoX, Llama,
Qwen2, Qwen3), so each decode step has fixed shapes: input ``[B, 1]``, a ``[B, P+N]`` attention
mask written once, positions counted from the left-padded prompt mask exactly as ``generate``
counts them. Fixed shapes are what lets ``torch.compile(mode="reduce-overhead")`` capture the
step in a CUDA graph (an ACL graph on NPU): the default on accelerators, eager on CPU. Compared
with ``model.generate`` there is no logits-processor / stopping-criteria machinery per step,
only the last position's logits are computed in prefill, and the host waits for the device
only every few steps (to ask whether every row has ended), not every token.

Rows stop at any of several EOS ids: :func:`stop_ids` gives a model's (Qwen3's generation
config lists two) together with its tokenizer's.

MiniLLM's mixed sampling (``teacher`` with ``teacher_mix`` = w): the next token is drawn from
``w·p_teacher + (1−w)·q_student`` (both at ``temperature``); the teacher keeps its own cache.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["SampleOutput", "sample", "generate_texts", "filter_probs", "stop_ids"]

CHECK_EVERY = 16  # decode steps between "has every row ended?" checks on accelerators
CACHE_BUCKET = 64  # compiled decoding rounds the static cache length up to a multiple of this


@dataclass
class SampleOutput:
    """What :func:`sample` returns.

    sequences: ``[B, P+N]`` the left-padded prompt followed by N generated positions, where
        N <= max_new_tokens is the number of steps taken (the loop stops once every row has
        ended). After a row's EOS its positions hold ``pad_token_id``.
    response_mask: ``[B, P+N]`` bool, True on generated tokens up to and including EOS.
    prompt_length: P.
    teacher_mixed: True when tokens were drawn from a teacher–student mixture.
    """

    sequences: Tensor
    response_mask: Tensor
    prompt_length: int
    teacher_mixed: bool


def filter_probs(probs: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k then nucleus (top-p) filtering of probabilities ``[B, V]``, renormalised.

    top_k=0 and top_p=1 keep everything. Top-p keeps the smallest set of most likely tokens
    whose mass reaches ``top_p`` (always at least one token).
    """
    if top_k and top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        drop_sorted = before >= top_p * sorted_p.sum(-1, keepdim=True)
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> Tensor | None:
    """The stop ids as a ``[n]`` tensor; None (rows run to max_new_tokens) for None or an empty
    list, which is what :func:`stop_ids` gives for a model and tokenizer that name no EOS."""
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        return None
    if not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be a non-negative int or a list of them, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.long, device=device)


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    values = [value] if isinstance(value, int) else list(value)
    return [int(v) for v in values if isinstance(v, int) and v >= 0]


def stop_ids(model_or_config: Any, tokenizer: Any = None) -> list[int]:
    """Every id a generated row should end at, in order, without repeats: the model's
    ``generation_config.eos_token_id`` (an int or a list: Qwen3 lists ``<|im_end|>`` and
    ``<|endoftext|>``) and the tokenizer's ``eos_token_id``. A model wrapped by DDP or
    DeepSpeed is unwrapped; a config (``GenerationConfig`` or a model config) is read as it
    is. ``[]`` when neither names one (:func:`sample` then runs every row to the end).

    Stopping only at the tokenizer's EOS lets an instruction model run past its end-of-turn
    token into a second, invented turn, and the loss then trains on it."""
    obj = model_or_config
    while hasattr(obj, "module"):
        obj = obj.module
    gen = getattr(obj, "generation_config", None)
    ids = _as_ids(getattr(gen if gen is not None else obj, "eos_token_id", None))
    if tokenizer is not None:
        ids += _as_ids(getattr(tokenizer, "eos_token_id", None))
    return list(dict.fromkeys(ids))


def _max_positions(model) -> int | None:
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


def _zero3(model) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the model's parameters (each forward gathers them
    through hooks, which a captured graph cannot replay)."""
    p = next(model.parameters(), None)
    return p is not None and hasattr(p, "ds_id")


def _use_compile(compile: bool | None, device: torch.device, models: Sequence[Any]) -> bool:
    """Whether decode steps run compiled. ``None`` (auto): on CUDA and NPU, where one
    captured graph per step replaces hundreds of kernel launches, unless ZeRO-3 partitions a
    model; eager on CPU, where compiling costs more than it saves."""
    accel = device.type in ("cuda", "npu")
    if compile is None:
        return accel and not any(_zero3(m) for m in models)
    if compile and not accel:
        log.warning("compile=True ignored on %s: graph capture needs a CUDA or NPU device", device.type)
        return False
    return bool(compile)


def _compile_config(device_type: str) -> Any:
    """The ``torch.compile`` settings of the decode step: transformers' default on CUDA
    (inductor, ``reduce-overhead`` = CUDA graphs); on NPU torch-npu's ``npugraph_ex`` backend
    (ACL graphs, the NPU analogue), static shapes. None when the NPU backend is missing."""
    if device_type != "npu":
        return None  # transformers' CompileConfig(): inductor + reduce-overhead
    from transformers import CompileConfig

    if "npugraph_ex" not in torch._dynamo.list_backends(exclude_tags=()):
        return None
    return CompileConfig(backend="npugraph_ex", mode="default", dynamic=False, fullgraph=False)


def _cache_len(max_len: int, models: Sequence[Any], bucket: int) -> int:
    """Static cache length: ``max_len`` rounded up to a multiple of ``bucket`` (within every
    model's positions). Compiled decoding keeps its cache on the model and reuses it for any
    call that fits (:func:`_static_cache`); rounding up makes the cache grow in a few
    steps, each a recompile, instead of with every new prompt width. Positions past the
    prompt are causally masked, so the extra ones change no result."""
    want = -(-max_len // bucket) * bucket
    limits = [n for n in (_max_positions(m) for m in models) if n is not None]
    return max(max_len, min([want] + limits))


def _static_cache(model, batch: int, max_len: int, reuse: bool) -> tuple[Any, int]:
    """``(StaticCache, its length)`` for ``batch`` rows of at least ``max_len`` positions.
    With ``reuse`` (compiled decoding) the cache is kept on the model and reset between
    calls, and a held cache at least as long is reused: compiled graphs guard on the
    cache's buffers and captured graphs record their addresses, so a new cache means a
    recompile and a new capture. The key also holds the autocast state, which sets the
    cache's dtype."""
    from transformers import StaticCache

    if not reuse:
        return StaticCache(config=model.config, max_cache_len=max_len), max_len
    dev = next(model.parameters()).device.type
    mode = (batch, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
    held = model.__dict__.get("_cbd_static_cache")
    if held is not None and held[0] == mode and held[1] >= max_len:
        held[2].reset()
        return held[2], held[1]
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    model.__dict__["_cbd_static_cache"] = (mode, max_len, cache)  # lives and dies with the model
    return cache, max_len


class _Stepper:
    """One model's cache and forward call. Static cache when the family takes it, else the
    dynamic one (noted at DEBUG level): correctness first. ``compile``: decode steps through
    the model's compiled call; ``strict`` False (auto mode) falls back to eager, with a
    warning, when the first compiled step fails, and the model decodes eagerly in auto mode
    from then on."""

    def __init__(self, model, cache_len: int, prompt_mask: Tensor, compile: bool, strict: bool = True):
        self.model = model
        self.static = True
        self.strict, self.verified = strict, False
        batch, device = prompt_mask.shape[0], prompt_mask.device
        try:
            self.cache, cache_len = _static_cache(model, batch, cache_len, reuse=compile)
        except Exception as e:  # noqa: BLE001 - an unusual config: fall back, still correct
            log.debug("StaticCache unavailable for %s (%s); using the dynamic cache", type(model).__name__, e)
            self.cache, self.static = None, False
        # [B, cache_len]: the prompt's mask, then ones (positions not yet written are causally masked)
        self.full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, cache_len - prompt_mask.shape[1])], 1)
        self.forward = self.decode_forward = model.__call__
        self.compiled = False
        if compile and self.static and (strict or not model.__dict__.get("_cbd_compile_failed")):
            cfg = _compile_config(device.type)
            if cfg is None and device.type != "cuda":
                log.info("no graph-capture backend for %s: decoding eagerly", device.type)
            else:
                # Fixed decode shapes -> captured graphs; prefill (varying P) stays eager.
                # transformers keeps one compiled call per model, as its own generate does.
                self.decode_forward, self.compiled = model.get_compiled_call(cfg), True

    def __call__(self, ids: Tensor, positions: Tensor, cur_len: int, prefill: bool) -> Tensor:
        """Last-position logits ``[B, V]`` (model dtype) after feeding ``ids`` ``[B, q]``."""
        # A static cache sizes the mask to the whole cache; the dynamic one to what it holds.
        mask = self.full_mask if self.static else self.full_mask[:, :cur_len]
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                  use_cache=True, logits_to_keep=1)
        if prefill or not self.compiled:
            out = self.forward(**kw)
        elif self.verified or self.strict:
            out = self.decode_forward(**kw)
            self.verified = True
        else:
            out = self._first_compiled(kw)
        if not self.static:
            self.cache = out.past_key_values
        return out.logits[:, -1]

    def _first_compiled(self, kw: dict[str, Any]) -> Any:
        """The first compiled decode step in auto mode: on failure the cache's write positions
        are restored and the step (and every later one) runs eagerly."""
        lengths = [(l, l.cumulative_length.clone()) for l in getattr(self.cache, "layers", [])
                   if isinstance(getattr(l, "cumulative_length", None), Tensor)]
        try:
            out = self.decode_forward(**kw)
        except Exception as e:  # noqa: BLE001 - auto mode: a correct eager run beats a crash
            log.warning("compiled decoding failed for %s (%s: %s); decoding eagerly",
                        type(self.model).__name__, type(e).__name__, e)
            for layer, n in lengths:
                layer.cumulative_length.copy_(n)
            self.decode_forward, self.compiled = self.forward, False
            self.model.__dict__["_cbd_compile_failed"] = True  # later auto-mode calls decode eagerly
            out = self.forward(**kw)
        self.verified = True
        return out


def _check_args(input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, temperature: float, top_k: int,
                top_p: float, do_sample: bool, teacher: Any, teacher_mix: float, check_every: int | None) -> None:
    """Refuse bad arguments before any forward pass (each message names the value)."""
    if input_ids.ndim != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"input_ids and attention_mask must both be [B, P]; got {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"empty prompt batch {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if do_sample and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not (0.0 <= teacher_mix <= 1.0):
        raise ValueError(f"teacher_mix must be in [0, 1], got {teacher_mix!r}")
    if teacher_mix > 0 and teacher is None:
        raise ValueError(f"teacher_mix={teacher_mix} needs a teacher model")
    if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
        raise ValueError(f"check_every must be an int >= 1 (or None: auto), got {check_every!r}")
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] is 0 for some row")
    if (attention_mask.sum(-1) == 0).any():
        raise ValueError("a prompt row has no tokens (attention_mask all 0)")


def _check_room(models: Sequence[Any], p_len: int, max_new_tokens: int) -> None:
    for m in models:
        limit = _max_positions(m)
        if limit is not None and p_len + max_new_tokens > limit:
            raise ValueError(f"prompt length {p_len} + max_new_tokens {max_new_tokens} = {p_len + max_new_tokens} "
                             f"exceeds the model's {limit} positions")


def _default_rng(device: torch.device) -> torch.Generator | None:
    """The generator ``torch.multinomial(..., generator=None)`` draws from on ``device`` (None
    when this torch cannot name it)."""
    if device.type == "cpu":
        return torch.default_generator
    mod = getattr(torch, device.type, None)
    gens = getattr(mod, "default_generators", None)
    if not gens:
        return None
    return gens[device.index if device.index is not None else mod.current_device()]


@torch.no_grad()
def sample(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    do_sample: bool = True,
    teacher=None,
    teacher_mix: float = 0.0,
    generator: torch.Generator | None = None,
    compile: bool | None = None,
    check_every: int | None = None,
) -> SampleOutput:
    """Sample up to ``max_new_tokens`` tokens after each left-padded prompt.

    input_ids, attention_mask: ``[B, P]``, prompts left-padded (attention_mask 0 on padding).
    ``do_sample=False`` is greedy (argmax of the, possibly mixed, distribution); otherwise
    tokens are drawn after ``temperature``, ``top_k`` and ``top_p`` with ``generator``.
    ``eos_token_id``: one id or several (:func:`stop_ids` gives a model's); a row ends at
    the first of them; None or ``[]``: every row runs to ``max_new_tokens``. ``teacher`` + ``teacher_mix`` in (0, 1]: MiniLLM mixed sampling (see
    module docstring); vocabularies that differ only by padding are cut to the shared size.
    ``compile``: decode steps through a captured graph (CUDA graphs / NPU ACL graphs);
    None (auto) compiles on CUDA and NPU and not on CPU; True on CPU is ignored.
    ``check_every``: decode steps between host checks for "every row ended" (None: 1 on CPU,
    where a check is free, 16 on accelerators, where each check waits for the device); the
    result, and the generator's state afterwards, are the same for every value.
    Models are run in eval mode and restored to their previous mode afterwards.
    """
    _check_args(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, do_sample, teacher,
                teacher_mix, check_every)
    attention_mask = attention_mask.to(torch.long)
    p_len = input_ids.shape[1]
    mixed = teacher is not None and teacher_mix > 0
    models = [model] + ([teacher] if mixed else [])
    _check_room([model] + ([teacher] if teacher is not None else []), p_len, max_new_tokens)
    device = input_ids.device
    if generator is not None and do_sample and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the prompts are on {device}; "
                         "make it with torch.Generator(device=...) on the model's device")
    eos = _eos_tensor(eos_token_id, device)
    use_compile = _use_compile(compile, device, models)
    every = check_every or (1 if device.type == "cpu" else CHECK_EVERY)
    rng = (generator if generator is not None else _default_rng(device)) if do_sample else None
    cache_len = _cache_len(p_len + max_new_tokens, models, CACHE_BUCKET if use_compile else 1)

    was_training = [m.training for m in models]
    # and every module's own flag, restored as it was (a student whose checkpointed layers
    # alone train, cbd_ray.train.set_student_mode, keeps that mixed state)
    flags = [(sub, sub.training) for m in models for sub in m.modules()]
    for m in models:
        m.eval()
    try:
        steppers = [_Stepper(m, cache_len, attention_mask, use_compile, strict=compile is not None) for m in models]

        def choose(logits: list[Tensor]) -> Tensor:
            return _choose(logits, temperature, top_k, top_p, do_sample, teacher_mix if mixed else 0.0, rng)

        seqs, resp, steps = _decode(steppers, choose, input_ids, attention_mask, max_new_tokens, eos,
                                    pad_token_id, every, rng)
        return SampleOutput(seqs[:, :p_len + steps], resp[:, :p_len + steps], p_len, mixed)
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
        for sub, t in flags:
            sub.training = t


def _decode(steppers: list[_Stepper], choose: Any, input_ids: Tensor, attention_mask: Tensor, n_new: int,
            eos: Tensor | None, pad_id: int, every: int, rng: torch.Generator | None) -> tuple[Tensor, Tensor, int]:
    """The decode loop: ``(sequences [B, P+n_new], response mask [B, P+n_new], steps)``, of
    which the first ``P + steps`` columns are the result.

    The device is asked "has every row ended?" only every ``every`` steps: a check waits for
    the device, and waiting every token serialises host and device. Rows end on the device
    (``ended`` holds each row's length), so the answer is exact: ``steps`` is the step at
    which the last row ended, as if checked every token; the extra steps' tokens are
    dropped, and the sampling generator is put back to its state after step ``steps``.
    """
    batch, p_len = input_ids.shape
    device = input_ids.device
    seqs = torch.full((batch, p_len + n_new), pad_id, dtype=input_ids.dtype, device=device)
    seqs[:, :p_len] = input_ids
    resp = torch.zeros(batch, p_len + n_new, dtype=torch.bool, device=device)
    pads = torch.full((batch,), pad_id, dtype=input_ids.dtype, device=device)
    # positions as generate counts them: cumulative count of real tokens - 1, pads at 0
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    ended = torch.full((batch,), n_new, dtype=torch.long, device=device)  # steps each row took
    states: dict[int, Tensor] = {}  # generator state after each step since the last check
    ids, pos = input_ids, positions
    for step in range(n_new):
        cur_len = p_len + step
        # after this call the caches hold cur_len tokens (the prompt, then one per step)
        tok = torch.where(done, pads, choose([st(ids, pos, cur_len, step == 0) for st in steppers]))
        seqs[:, cur_len] = tok
        resp[:, cur_len] = ~done
        if eos is not None:
            stop = torch.isin(tok, eos) & ~done
            ended = torch.where(stop, step + 1, ended)
            done = done | stop
            if rng is not None:
                states[step + 1] = rng.get_state()
            if (step + 1) % every == 0:
                if bool(done.all()):
                    break
                states.clear()
        ids, pos = tok.unsqueeze(1), next_pos
        next_pos = next_pos + 1
    if eos is None:
        return seqs, resp, n_new
    steps = int(ended.max())  # one wait for the device, at the end
    if steps in states:
        rng.set_state(states[steps])
    return seqs, resp, steps


def _choose(logits: list[Tensor], temperature: float, top_k: int, top_p: float, do_sample: bool,
            teacher_mix: float, generator: torch.Generator | None) -> Tensor:
    """Next token ``[B]`` from the student's (and teacher's) last logits ``[B, V]``."""
    student = logits[0].float()
    if len(logits) == 1:
        if not do_sample:
            return student.argmax(-1)
        probs = torch.softmax(student / temperature, dim=-1)
    else:
        teacher = logits[1].float()
        v = min(student.shape[-1], teacher.shape[-1])  # padded vocabularies: the shared part
        t = temperature if do_sample else 1.0
        probs = (teacher_mix * torch.softmax(teacher[:, :v] / t, -1)
                 + (1.0 - teacher_mix) * torch.softmax(student[:, :v] / t, -1))
        if not do_sample:
            return probs.argmax(-1)
    probs = filter_probs(probs, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16, **kw: Any) -> list[str]:
    """Completions (generated text only, special tokens dropped) for ``prompts``, in order.

    Prompts are sorted by length so each batch pads little, left-padded, and run through
    :func:`sample` in batches of ``batch_size``; ``kw`` goes to :func:`sample` (EOS defaults
    to :func:`stop_ids` of model and tokenizer, pad to the tokenizer's).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string")
    if not prompts:
        return []
    kw.setdefault("eos_token_id", stop_ids(model, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw.setdefault("pad_token_id", pad if pad is not None else 0)
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [encoded[i] or [kw["pad_token_id"]] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), kw["pad_token_id"], dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, width - len(r):] = torch.tensor(r)
            mask[j, width - len(r):] = 1
        res = sample(model, ids.to(device), mask.to(device), max_new_tokens, **kw)
        gen = res.sequences[:, res.prompt_length:]
        keep = res.response_mask[:, res.prompt_length:]
        for j, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[j][keep[j]].tolist(), skip_special_tokens=True)
        log.debug("generated batch %d/%d", start // batch_size + 1, -(-len(order) // batch_size))
    return out

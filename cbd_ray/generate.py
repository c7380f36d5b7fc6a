"""Fast batched sampling for SeqKD pseudo-labels, on-policy KD and MiniLLM rollouts.

One loop over Hugging Face ``AutoModelForCausalLM`` forward passes with a pre-allocated
``transformers.StaticCache`` (every family the project supports: GPT-2, GPT-NeoX, Llama,
Qwen2, Qwen3), so each decode step has fixed shapes: input ``[B, 1]``, a ``[B, P+N]`` attention
mask written once, positions counted from the left-padded prompt mask exactly as ``generate``
counts them. Fixed shapes are what lets ``torch.compile(mode="reduce-overhead")`` capture the
step in a CUDA graph (``compile=True``, CUDA only). Compared with ``model.generate`` there is
no logits-processor / stopping-criteria machinery per step and only the last position's logits
are computed in prefill.

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

__all__ = ["SampleOutput", "sample", "generate_texts", "filter_probs"]


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
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be a non-negative int or a list of them, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.long, device=device)


def _max_positions(model) -> int | None:
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


class _Stepper:
    """One model's cache and forward call. Static cache when the family takes it, else the
    dynamic one (noted at DEBUG level): correctness first."""

    def __init__(self, model, batch: int, max_len: int, full_mask: Tensor, compile: bool):
        self.model = model
        self.full_mask = full_mask
        self.static = True
        try:
            self.cache = self._static_cache(model, batch, max_len, reuse=compile)
        except Exception as e:  # noqa: BLE001 - an unusual config: fall back, still correct
            log.debug("StaticCache unavailable for %s (%s); using the dynamic cache", type(model).__name__, e)
            self.cache, self.static = None, False
        self.forward = model.__call__
        if compile and self.static:
            # Fixed decode shapes -> CUDA graphs ("reduce-overhead"); prefill (varying P) stays
            # eager. transformers keeps one compiled call per model, as its own generate does.
            self.decode_forward = model.get_compiled_call(None)
        else:
            self.decode_forward = model.__call__

    @staticmethod
    def _static_cache(model, batch: int, max_len: int, reuse: bool):
        """A StaticCache for ``batch`` × ``max_len``. With ``reuse`` (compiled decoding) the
        cache is kept on the model and reset between calls: CUDA graphs record its buffers'
        addresses, so a new cache per call would mean a new capture per call."""
        from transformers import StaticCache

        if not reuse:
            return StaticCache(config=model.config, max_cache_len=max_len)
        key = (batch, max_len)
        held = model.__dict__.get("_cbd_static_cache")
        if held is not None and held[0] == key:
            held[1].reset()
            return held[1]
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        model.__dict__["_cbd_static_cache"] = (key, cache)  # lives and dies with the model
        return cache

    def __call__(self, ids: Tensor, positions: Tensor, cur_len: int, prefill: bool) -> Tensor:
        """Last-position logits ``[B, V]`` (model dtype) after feeding ``ids`` ``[B, q]``."""
        # A static cache sizes the mask to the whole cache; the dynamic one to what it holds.
        mask = self.full_mask if self.static else self.full_mask[:, :cur_len]
        fwd = self.forward if prefill else self.decode_forward
        out = fwd(
            input_ids=ids, attention_mask=mask, position_ids=positions,
            past_key_values=self.cache, use_cache=True, logits_to_keep=1,
        )
        if not self.static:
            self.cache = out.past_key_values
        return out.logits[:, -1]


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
    compile: bool = False,
) -> SampleOutput:
    """Sample up to ``max_new_tokens`` tokens after each left-padded prompt.

    input_ids, attention_mask: ``[B, P]``, prompts left-padded (attention_mask 0 on padding).
    ``do_sample=False`` is greedy (argmax of the, possibly mixed, distribution); otherwise
    tokens are drawn after ``temperature``, ``top_k`` and ``top_p`` with ``generator``.
    ``teacher`` + ``teacher_mix`` in (0, 1]: MiniLLM mixed sampling (see module docstring);
    vocabularies that differ only by padding are cut to the shared size.
    ``compile=True`` (CUDA only; ignored elsewhere) compiles the decode step for CUDA graphs.
    Models are run in eval mode and restored to their previous mode afterwards.
    """
    # ---- validate before any forward pass
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
    attention_mask = attention_mask.to(torch.long)
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] is 0 for some row")
    if (attention_mask.sum(-1) == 0).any():
        raise ValueError("a prompt row has no tokens (attention_mask all 0)")
    batch, p_len = input_ids.shape
    max_len = p_len + max_new_tokens
    for m in (model, teacher):
        limit = _max_positions(m) if m is not None else None
        if limit is not None and max_len > limit:
            raise ValueError(
                f"prompt length {p_len} + max_new_tokens {max_new_tokens} = {max_len} exceeds the model's {limit} positions"
            )
    device = input_ids.device
    if generator is not None and do_sample and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the prompts are on {device}; "
                         "make it with torch.Generator(device=...) on the model's device")
    eos = _eos_tensor(eos_token_id, device)
    mixed = teacher is not None and teacher_mix > 0
    use_compile = bool(compile) and device.type == "cuda"
    if compile and not use_compile:
        log.warning("compile=True ignored on %s: CUDA graphs need a CUDA device", device.type)

    models = [model] + ([teacher] if mixed else [])
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        # ---- static buffers: the full attention mask, the output, the response mask
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, max_new_tokens)], dim=1)
        seqs = torch.full((batch, max_len), pad_token_id, dtype=input_ids.dtype, device=device)
        seqs[:, :p_len] = input_ids
        resp = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        steppers = [_Stepper(m, batch, max_len, full_mask, use_compile) for m in models]

        # positions as generate counts them: cumulative count of real tokens - 1, pads at 0
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        next_pos = positions[:, -1:] + 1
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        ids, pos, steps = input_ids, positions, 0
        for step in range(max_new_tokens):
            cur_len = p_len + step
            # after this call the cache holds cur_len tokens (the prompt, then one per step)
            logits = [st(ids, pos, cur_len, step == 0) for st in steppers]
            tok = _choose(logits, temperature, top_k, top_p, do_sample, teacher_mix if mixed else 0.0, generator)
            tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
            seqs[:, cur_len] = tok
            resp[:, cur_len] = ~done
            if eos is not None:
                done = done | torch.isin(tok, eos)
            steps = step + 1
            if eos is not None and bool(done.all()):
                break
            ids, pos = tok.unsqueeze(1), next_pos
            next_pos = next_pos + 1
        return SampleOutput(seqs[:, :p_len + steps], resp[:, :p_len + steps], p_len, mixed)
    finally:
        for m, t in zip(models, was_training):
            m.train(t)


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
    :func:`sample` in batches of ``batch_size``; ``kw`` goes to :func:`sample` (eos/pad default
    to the tokenizer's).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string")
    if not prompts:
        return []
    kw.setdefault("eos_token_id", tokenizer.eos_token_id)
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

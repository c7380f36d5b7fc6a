"""Distillation losses: small pure functions over logits, plus one chunking wrapper.

Conventions shared by every function here:

* ``student_logits`` and ``teacher_logits`` are ``[B, T, V]`` (any float dtype); ``mask`` is
  ``[B, T]`` bool or 0/1, True where a token counts (response tokens; prompt and padding are
  False). Only counted tokens are ever read: masked positions may hold anything, even NaN.
* Logits are upcast to float32 and divided by ``temperature`` (both models) before the softmax.
  No T² factor is applied; a caller that wants Hinton's scaling multiplies by it.
* Vocabulary entries that are ``-inf`` (e.g. padded vocabularies) are floored at -1e30 before
  the softmax: probability exactly 0, finite logs, so they contribute 0 instead of
  ``0 * inf = nan`` to values and gradients.
* The result is a float32 scalar: the mean over counted tokens of a per-token divergence (summed
  over the vocabulary). With no counted token it is 0.0 and still carries a (zero) gradient, so
  a data-parallel step whose shard is all prompt never breaks ``backward()``.

Divergences (``p`` = teacher, ``q`` = student):

=========  ====================================  ==========================================
name       per token                             notes
=========  ====================================  ==========================================
``fkl``    KL(p ‖ q)                             mode covering (standard KD)
``rkl``    KL(q ‖ p)                             mode seeking (MiniLLM)
``jsd``    β·KL(p ‖ m) + (1−β)·KL(q ‖ m),        generalised JSD of GKD (Agarwal et al. 2024),
           m = β·p + (1−β)·q                     as in TRL: β=0 → forward KL, β=1 → reverse KL
``sfkl``   KL(p ‖ α·p + (1−α)·q)                 DistiLLM skew forward KL (Ko et al. 2024)
``srkl``   KL(q ‖ α·q + (1−α)·p)                 DistiLLM skew reverse KL
=========  ====================================  ==========================================

For 0 < β < 1 the JSD is a bounded divergence; as β → 0 it vanishes like β·KL(p ‖ q) and as
β → 1 like (1−β)·KL(q ‖ p), so at the two ends themselves (where the mixture collapses) the
function returns the unscaled forward and reverse KL, exactly as TRL's ``generalized_jsd_loss``.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "cross_entropy",
    "DIVERGENCES", "divergence", "chunked", "kd_loss_from_hidden", "token_logprobs",
    "rows_for_budget", "kd_chunk_rows", "DEFAULT_CHUNK_BYTES",
]


# ---------------------------------------------------------------------------------------------
# argument checks (cheap, before any tensor work)

def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_unit(name: str, value: float, closed_right: bool = True) -> None:
    ok = isinstance(value, (int, float)) and 0.0 <= value and (value <= 1.0 if closed_right else value < 1.0)
    if not ok:
        allowed = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")


def _check_pair(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> None:
    if student_logits.ndim != 3 or teacher_logits.ndim != 3:
        raise ValueError(
            f"logits must be [B, T, V]; got student {tuple(student_logits.shape)}, "
            f"teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; slice both to the shared vocabulary first"
        )
    if tuple(mask.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(f"mask must be [B, T] = {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}")


# ---------------------------------------------------------------------------------------------
# per-token kernels: rows [N, V] float32 log-probabilities in, [N] divergences out

def _kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) per row from log-probabilities ``[N, V]`` -> ``[N]``.

    The logits were clamped to a finite floor (:data:`_NEG`) before the softmax, so an entry
    that is "-inf" has a = exp(-1e30) = 0 exactly and a finite log: its term is 0·finite = 0,
    with finite gradients, instead of ``0 · (-inf) = nan``.
    """
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1−w)·b) from log-probabilities, stable (logsumexp), for 0 < w < 1."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


# Floor for logits: -inf (padded or banned vocabulary entries) becomes this finite value, so
# neither values nor gradients meet inf - inf; exp() of it is exactly 0 in float32.
_NEG = -1e30


def _rows_fkl(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl_rows(log_p, log_q)


def _rows_rkl(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl_rows(log_q, log_p)


def _rows_jsd(log_q: Tensor, log_p: Tensor, beta: float = 0.5) -> Tensor:
    if beta == 0.0:
        return _kl_rows(log_p, log_q)
    if beta == 1.0:
        return _kl_rows(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)


def _rows_sfkl(log_q: Tensor, log_p: Tensor, alpha: float = 0.1) -> Tensor:
    log_m = log_q if alpha == 0.0 else _log_mix(log_p, log_q, alpha)
    return _kl_rows(log_p, log_m)


def _rows_srkl(log_q: Tensor, log_p: Tensor, alpha: float = 0.1) -> Tensor:
    log_m = log_p if alpha == 0.0 else _log_mix(log_q, log_p, alpha)
    return _kl_rows(log_q, log_m)


def _counted(x: Tensor, mask: Tensor) -> Tensor:
    """``[B, T, ...]`` -> ``[N, ...]``: the counted tokens only (a gather, so masked rows are
    never touched by later arithmetic)."""
    return x.reshape(-1, *x.shape[2:])[mask.reshape(-1).bool()]


def _token_sum(rows_fn: Callable[..., Tensor], s_rows: Tensor, t_rows: Tensor, temperature: float, **kw) -> Tensor:
    """Sum over rows ``[N, V]`` of the per-token divergence, float32 scalar."""
    return rows_fn(_log_probs(s_rows, temperature), _log_probs(t_rows, temperature), **kw).sum()


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """float32 log-softmax of ``logits / temperature`` with -inf floored to :data:`_NEG`."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x.clamp(min=_NEG), dim=-1)


def _mean_divergence(rows_fn, student_logits, teacher_logits, mask, temperature, **kw) -> Tensor:
    _check_temperature(temperature)
    _check_pair(student_logits, teacher_logits, mask)
    s_rows, t_rows = _counted(student_logits, mask), _counted(teacher_logits, mask)
    total = _token_sum(rows_fn, s_rows, t_rows, temperature, **kw)  # 0.0 with grad_fn when N == 0
    return total / max(s_rows.shape[0], 1)


# ---------------------------------------------------------------------------------------------
# public divergences

def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over counted tokens of KL(p_teacher ‖ q_student).

    student_logits, teacher_logits: ``[B, T, V]``; mask: ``[B, T]``. Returns a float32 scalar.
    """
    return _mean_divergence(_rows_fkl, student_logits, teacher_logits, mask, temperature)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over counted tokens of KL(q_student ‖ p_teacher). Shapes as :func:`forward_kl`."""
    return _mean_divergence(_rows_rkl, student_logits, teacher_logits, mask, temperature)


def jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Generalised Jensen–Shannon divergence of GKD/TRL, mean over counted tokens.

    ``β·KL(p ‖ m) + (1−β)·KL(q ‖ m)`` with ``m = β·p + (1−β)·q`` (p teacher, q student).
    ``beta=0`` returns forward KL(p ‖ q), ``beta=1`` reverse KL(q ‖ p) (see module docstring).
    Shapes as :func:`forward_kl`.
    """
    _check_unit("beta", beta)
    return _mean_divergence(_rows_jsd, student_logits, teacher_logits, mask, temperature, beta=float(beta))


def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """DistiLLM α-skew forward KL: KL(p ‖ α·p + (1−α)·q); ``alpha=0`` is forward KL.
    Shapes as :func:`forward_kl`."""
    _check_unit("alpha", alpha, closed_right=False)
    return _mean_divergence(_rows_sfkl, student_logits, teacher_logits, mask, temperature, alpha=float(alpha))


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, alpha: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """DistiLLM α-skew reverse KL: KL(q ‖ α·q + (1−α)·p); ``alpha=0`` is reverse KL.
    Shapes as :func:`forward_kl`."""
    _check_unit("alpha", alpha, closed_right=False)
    return _mean_divergence(_rows_srkl, student_logits, teacher_logits, mask, temperature, alpha=float(alpha))


def cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Mean token cross-entropy over counted tokens, float32.

    logits: ``[B, T, V]``; labels: ``[B, T]`` already aligned with the logits (the caller shifts);
    mask: ``[B, T]``. Labels at masked positions are never read (they may be -100 or pad).
    """
    if logits.ndim != 3 or tuple(labels.shape) != tuple(logits.shape[:2]) or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"cross_entropy wants logits [B, T, V], labels and mask [B, T]; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(mask.shape)}"
        )
    rows, targets = _counted(logits, mask).float(), _counted(labels, mask).long()
    return F.cross_entropy(rows, targets, reduction="sum") / max(rows.shape[0], 1)


def token_logprobs(logits: Tensor, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """log q(token) per position, float32 ``[B, T]``.

    logits: ``[B, T, V]``; tokens: ``[B, T]`` aligned with the logits. Positions where ``mask``
    is False are 0 (their logits and tokens are never read). Computed as ``logit − logsumexp``
    on the counted positions only, without a ``[B, T, V]`` log-softmax.
    """
    if logits.ndim != 3 or tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"token_logprobs wants logits [B, T, V] and tokens [B, T]; got {tuple(logits.shape)}, {tuple(tokens.shape)}"
        )
    if mask is None:
        picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1).float()
        return picked - torch.logsumexp(logits.float(), dim=-1)
    if tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(f"mask must be [B, T] = {tuple(tokens.shape)}, got {tuple(mask.shape)}")
    keep = mask.reshape(-1).bool()
    rows, idx = _counted(logits, mask), _counted(tokens, mask).long()  # counted positions only
    vals = rows.gather(-1, idx.unsqueeze(-1)).squeeze(-1).float() - torch.logsumexp(rows.float(), dim=-1)
    out = torch.zeros(keep.shape[0], dtype=torch.float32, device=logits.device)
    return out.masked_scatter(keep, vals).reshape(tokens.shape)


# ---------------------------------------------------------------------------------------------
# registry

DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": jsd,
    "sfkl": skew_forward_kl,
    "srkl": skew_reverse_kl,
}

# the per-token kernels behind each public name: used by kd_loss_from_hidden
_ROWS: dict[str, Callable[..., Tensor]] = {
    "fkl": _rows_fkl, "rkl": _rows_rkl, "jsd": _rows_jsd, "sfkl": _rows_sfkl, "srkl": _rows_srkl,
}


def divergence(name: str, **kw) -> Callable[..., Tensor]:
    """The divergence called ``name`` with keyword arguments bound (e.g. ``beta``, ``alpha``,
    ``temperature``); the result is called as ``fn(student_logits, teacher_logits, mask)``.

    Unknown names and keywords raise ValueError listing what is allowed.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; allowed: {', '.join(DIVERGENCES)}")
    fn = DIVERGENCES[name]
    params = list(inspect.signature(fn).parameters)[3:]
    bad = sorted(set(kw) - set(params))
    if bad:
        raise ValueError(f"divergence {name!r} takes {', '.join(params)}; got unknown {', '.join(bad)}")
    _validate_kw(name, kw)
    return functools.partial(fn, **kw) if kw else fn


def _validate_kw(name: str, kw: dict) -> None:
    if "temperature" in kw:
        _check_temperature(kw["temperature"])
    if "beta" in kw:
        _check_unit("beta", kw["beta"])
    if "alpha" in kw:
        _check_unit("alpha", kw["alpha"], closed_right=False)


# Default memory budget for the vocabulary-sized float32 buffers one loss chunk holds.
DEFAULT_CHUNK_BYTES = 128 * 2**20
# [C, V] float32 buffers alive at once per chunk: the fused closed-form path (fkl, rkl: both
# logits, two log-softmaxes, p or q, the gradient reusing one of them) and an autograd graph
# over one chunk (other divergences, checkpoint recompute, MiniLLM's policy terms).
LIVE_FUSED, LIVE_AUTOGRAD = 6, 10


def rows_for_budget(budget_bytes: int, vocab: int, live: int) -> int:
    """Rows per chunk so that ``live`` float32 ``[rows, vocab]`` buffers fit in ``budget_bytes``
    (at least 1). E.g. 128 MiB, V = 50257, 6 buffers: 111 rows."""
    if not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ValueError(f"chunk byte budget must be a positive int, got {budget_bytes!r}")
    if not isinstance(vocab, int) or vocab < 1 or not isinstance(live, int) or live < 1:
        raise ValueError(f"vocab and live must be positive ints, got {vocab!r}, {live!r}")
    return max(1, budget_bytes // (4 * vocab * live))


def chunked(fn: Callable[..., Tensor], chunk_size: int) -> Callable[..., Tensor]:
    """Wrap a divergence so it works on ``chunk_size`` counted tokens at a time.

    The returned function has the same signature as ``fn``. The token axis is flattened
    (B·T), only counted tokens are kept, and ``fn`` runs on ``[1, chunk, V]`` slices; the
    per-chunk token sums are added and divided by the total count, so the result equals the
    unchunked mean (value and gradient). Each chunk runs under ``torch.utils.checkpoint``: its
    float32 upcast, softmaxes and autograd buffers are freed after the forward and recomputed
    in backward, so one chunk's worth exists at a time (the counted rows of the input logits
    themselves are still copied once, ``[N, V]`` in their own dtype).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    @functools.wraps(fn)
    def wrapper(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, **kw) -> Tensor:
        _check_pair(student_logits, teacher_logits, mask)
        s_rows, t_rows = _counted(student_logits, mask), _counted(teacher_logits, mask)
        n = s_rows.shape[0]
        if n == 0:  # keep the graph: zero with a grad path to the student
            return fn(student_logits[:, :0], teacher_logits[:, :0], mask[:, :0], **kw)

        def part(s: Tensor, t: Tensor) -> Tensor:
            ones = torch.ones(1, s.shape[0], dtype=torch.bool, device=s.device)
            return fn(s.unsqueeze(0), t.unsqueeze(0), ones, **kw) * s.shape[0]  # mean -> sum

        grad = torch.is_grad_enabled() and (s_rows.requires_grad or t_rows.requires_grad)
        total = None
        for start in range(0, n, chunk_size):
            s, t = s_rows[start:start + chunk_size], t_rows[start:start + chunk_size]
            p = torch.utils.checkpoint.checkpoint(part, s, t, use_reentrant=False) if grad else part(s, t)
            total = p if total is None else total + p
        return total / n

    return wrapper


# ---------------------------------------------------------------------------------------------
# logits from hidden states, one chunk at a time

def _head_parts(head: nn.Module | Tensor) -> tuple[Tensor, Tensor | None] | None:
    """(weight [V, H], bias [V] | None) when the head is a plain linear map, else None."""
    if isinstance(head, Tensor):
        return head, None
    if type(head) is nn.Linear:
        return head.weight, head.bias
    return None


def _apply_head(head: nn.Module | Tensor, h: Tensor, vocab: int | None) -> Tensor:
    """Logits ``[N, V']`` of hidden rows ``h`` ``[N, H]`` under ``head``, sliced to ``vocab``."""
    parts = _head_parts(head)
    if parts is not None:
        w, b = parts
        if vocab is not None:  # slice the weight, not the output: fewer FLOPs
            w, b = w[:vocab], (b[:vocab] if b is not None else None)
        return F.linear(h.to(w.dtype), w, b)
    out = head(h)
    return out[..., :vocab] if vocab is not None else out


def _check_kd_args(divergence: str, div_kw: dict, temperature: float, chunk_size: int | None,
                   chunk_bytes: int | None, vocab: int | None, student_hidden: Tensor, teacher_hidden: Tensor,
                   mask: Tensor) -> None:
    """kd_loss_from_hidden's argument checks: one line naming the bad value, before any work."""
    if divergence not in _ROWS:
        raise ValueError(f"unknown divergence {divergence!r}; allowed: {', '.join(_ROWS)}")
    allowed_kw = {"jsd": {"beta"}, "sfkl": {"alpha"}, "srkl": {"alpha"}}.get(divergence, set())
    bad = sorted(set(div_kw) - allowed_kw)
    if bad:
        raise ValueError(f"divergence {divergence!r} takes {sorted(allowed_kw) or 'no extra keywords'}; got {bad}")
    _validate_kw(divergence, div_kw)
    _check_temperature(temperature)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (from chunk_bytes), got {chunk_size!r}")
    if chunk_bytes is not None and (not isinstance(chunk_bytes, int) or chunk_bytes < 1):
        raise ValueError(f"chunk_bytes must be a positive int or None, got {chunk_bytes!r}")
    if vocab is not None and (not isinstance(vocab, int) or vocab < 1):
        raise ValueError(f"vocab must be a positive int or None, got {vocab!r}")
    if student_hidden.ndim != 3 or teacher_hidden.ndim != 3 or student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(
            f"hidden states must be [B, T, H] with the same B, T; got student {tuple(student_hidden.shape)}, "
            f"teacher {tuple(teacher_hidden.shape)}"
        )
    if tuple(mask.shape) != tuple(student_hidden.shape[:2]):
        raise ValueError(f"mask must be [B, T] = {tuple(student_hidden.shape[:2])}, got {tuple(mask.shape)}")


def _head_vocab(head: nn.Module | Tensor, vocab: int | None) -> int:
    """The number of logits a head yields (``vocab`` when slicing)."""
    if vocab is not None:
        return vocab
    parts = _head_parts(head)
    if parts is not None:
        return int(parts[0].shape[0])
    out = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", [None])[0]
    if not out:
        raise ValueError("cannot tell the vocabulary size of this head: pass vocab= or chunk_size=")
    return int(out)


def kd_chunk_rows(student_head: nn.Module | Tensor, teacher_head: nn.Module | Tensor, vocab: int | None,
                  divergence: str, chunk_bytes: int | None = None) -> int:
    """Rows per chunk of :func:`kd_loss_from_hidden` for the byte budget ``chunk_bytes``
    (default :data:`DEFAULT_CHUNK_BYTES`): fkl and rkl with plain linear heads take the fused
    closed-form path (:data:`LIVE_FUSED` buffers), the rest an autograd graph per chunk."""
    v = _head_vocab(student_head, vocab)
    fused = divergence in ("fkl", "rkl") and _head_parts(student_head) is not None and _head_parts(teacher_head) is not None
    return rows_for_budget(chunk_bytes or DEFAULT_CHUNK_BYTES, v, LIVE_FUSED if fused else LIVE_AUTOGRAD)


def kd_loss_from_hidden(
    student_hidden: Tensor,
    student_head: nn.Module | Tensor,
    teacher_hidden: Tensor,
    teacher_head: nn.Module | Tensor,
    mask: Tensor,
    divergence: str = "fkl",
    chunk_size: int | None = None,
    temperature: float = 1.0,
    vocab: int | None = None,
    chunk_bytes: int | None = None,
    **div_kw,
) -> Tensor:
    """A divergence between teacher and student computed from final hidden states.

    student_hidden: ``[B, T, Hs]``; teacher_hidden: ``[B, T, Ht]``; mask: ``[B, T]``. A head is an
    ``nn.Module`` mapping ``[N, H] -> [N, V]`` (e.g. ``model.get_output_embeddings()``) or a
    weight ``[V, H]``. The final (post-norm) hidden states of a Hugging Face causal LM are
    ``model(..., output_hidden_states=True, logits_to_keep=1).hidden_states[-1]`` for GPT-2,
    GPT-NeoX, Llama, Qwen2 and Qwen3 (through the model's own forward, so DDP sees the call).
    ``vocab`` slices both heads' outputs to the first ``vocab`` entries (vocabularies that differ
    only by padding, e.g. 151936 vs 152064); without it both must have the same size.

    Only counted tokens are projected, a chunk of rows at a time: ``chunk_size`` rows when
    given, else as many as fit the byte budget ``chunk_bytes`` (:func:`kd_chunk_rows`). So the
    extra memory is O(chunk × V), not O(B × T × V), for each model. Two ways, same result:

    * plain linear heads (``nn.Linear`` or a weight) and a frozen teacher: the student's
      gradients are computed per chunk during the forward pass and only scaled in backward
      (no recomputation; closed-form logit gradients for ``fkl``/``rkl``); under autocast the
      head products run in the autocast dtype, accumulation in float32;
    * anything else (a module head, a teacher that needs gradients, DeepSpeed ZeRO-3 weights
      that exist only inside the module's forward): each chunk runs under
      ``torch.utils.checkpoint``, its logits recomputed in backward.

    Equal (value and gradients) to the divergence on the full logits. Returns a float32 scalar.
    """
    _check_kd_args(divergence, div_kw, temperature, chunk_size, chunk_bytes, vocab, student_hidden, teacher_hidden, mask)
    chunk = chunk_size or kd_chunk_rows(student_head, teacher_head, vocab, divergence, chunk_bytes)
    rows_fn = functools.partial(_ROWS[divergence], **{k: float(v) for k, v in div_kw.items()})
    s_rows, t_rows = _counted(student_hidden, mask), _counted(teacher_hidden, mask)
    n = s_rows.shape[0]

    def chunk_sum(s_h: Tensor, t_h: Tensor) -> Tensor:
        s_logits = _apply_head(student_head, s_h, vocab)
        t_logits = _apply_head(teacher_head, t_h, vocab)
        if s_logits.shape[-1] != t_logits.shape[-1]:
            raise ValueError(
                f"student vocabulary {s_logits.shape[-1]} != teacher vocabulary {t_logits.shape[-1]}; "
                "pass vocab= the shared size"
            )
        return _token_sum(rows_fn, s_logits, t_logits, temperature)

    if n == 0:
        return chunk_sum(s_rows, t_rows) / 1.0  # empty rows: 0.0 with a grad path
    teacher_grad = t_rows.requires_grad or any(p.requires_grad for p in _params(teacher_head))
    student_grad = s_rows.requires_grad or any(p.requires_grad for p in _params(student_head))
    if not torch.is_grad_enabled() or not (student_grad or teacher_grad):
        with torch.no_grad():
            return sum(chunk_sum(s_rows[i:i + chunk], t_rows[i:i + chunk]) for i in range(0, n, chunk)) / n
    s_parts, t_parts = _head_parts(student_head), _head_parts(teacher_head)
    if (s_parts is not None and t_parts is not None and not teacher_grad
            and not _is_partitioned(s_parts[0]) and not _is_partitioned(t_parts[0])):
        return _fused(s_rows, s_parts, t_rows, t_parts, rows_fn, temperature, chunk, vocab)
    # general heads (any module, a teacher that needs gradients, ZeRO-3 partitioned weights
    # that only materialise inside the module's own forward): checkpoint each chunk, so its
    # logits are dropped after the forward and recomputed in backward
    total = None
    for start in range(0, n, chunk):
        s, t = s_rows[start:start + chunk], t_rows[start:start + chunk]
        part = torch.utils.checkpoint.checkpoint(chunk_sum, s, t, use_reentrant=False)
        total = part if total is None else total + part
    return total / n


def _fused(s_rows: Tensor, s_parts: tuple, t_rows: Tensor, t_parts: tuple, rows_fn: Callable[..., Tensor],
           temperature: float, chunk: int, vocab: int | None) -> Tensor:
    """Plain linear heads and a frozen teacher: gradients computed chunk by chunk in the
    forward pass, nothing recomputed (see :class:`_FusedLinearKD`)."""
    s_w, s_b = s_parts
    t_w, t_b = t_parts
    v_s = vocab or s_w.shape[0]
    v_t = vocab or t_w.shape[0]
    if v_s != v_t or v_s > min(s_w.shape[0], t_w.shape[0]):
        raise ValueError(
            f"student vocabulary {s_w.shape[0]} and teacher vocabulary {t_w.shape[0]} with vocab={vocab}: "
            "pass vocab= a shared size no larger than either"
        )
    if s_b is None:
        s_b = s_w.new_zeros(0)  # autograd.Function inputs must be tensors; empty = no bias
    return _FusedLinearKD.apply(s_rows, s_w, s_b, t_rows.detach(), t_w.detach(), t_b,
                                rows_fn, float(temperature), chunk, v_s)


def _owned_scaled_logits(logits: Tensor, temperature: float) -> Tensor:
    """float32 ``logits / temperature`` floored at :data:`_NEG`, as a tensor we may overwrite."""
    x = logits.float()  # float32 already: the fresh F.linear output, ours to overwrite
    if temperature != 1.0:
        x.div_(temperature)
    return x.clamp_(min=_NEG)


def _fkl_sum_and_grad(s_logits: Tensor, t_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Σ_rows KL(p ‖ q) and its gradient w.r.t. the student logits ``[C, V]``: (q − p)/T.

    Closed form with in-place steps: about four ``[C, V]`` float32 buffers live at once
    instead of the dozen an autograd graph of the same expression keeps."""
    log_q = torch.log_softmax(_owned_scaled_logits(s_logits, temperature), -1)
    log_p = torch.log_softmax(_owned_scaled_logits(t_logits, temperature), -1)
    p = log_p.exp()
    total = (log_p.sub_(log_q).mul_(p)).sum()          # log_p now holds p·(log p − log q)
    del log_p
    grad = log_q.exp_().sub_(p)                         # q − p
    if temperature != 1.0:
        grad.div_(temperature)
    return total, grad


def _rkl_sum_and_grad(s_logits: Tensor, t_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Σ_rows KL(q ‖ p) and its gradient w.r.t. the student logits: q·(log q − log p − KL)/T."""
    log_q = torch.log_softmax(_owned_scaled_logits(s_logits, temperature), -1)
    d = torch.log_softmax(_owned_scaled_logits(t_logits, temperature), -1)
    d.neg_().add_(log_q)                                # log q − log p
    q = log_q.exp_()
    kl = (q * d).sum(-1, keepdim=True)                  # [C, 1]
    grad = d.sub_(kl).mul_(q)
    if temperature != 1.0:
        grad.div_(temperature)
    return kl.sum(), grad


# divergences whose gradient is written out for the fused path (the rest use autograd per chunk)
_CLOSED_FORM = {_rows_fkl: _fkl_sum_and_grad, _rows_rkl: _rkl_sum_and_grad}


def _is_partitioned(w: Tensor) -> bool:
    """DeepSpeed ZeRO-3 keeps an empty placeholder in ``.data`` outside the module's forward."""
    return hasattr(w, "ds_id") or w.numel() == 0


class _FusedLinearKD(torch.autograd.Function):
    """Mean divergence of ``linear(h_s)`` vs ``linear(h_t)`` over rows, with the student's
    gradients computed in the forward pass one chunk at a time.

    Per chunk: student and teacher logits ``[C, V]`` are made, the float32 divergence and its
    gradient with respect to the student logits are taken (autograd on the chunk alone), and
    that gradient is pushed through the linear head at once (``g @ W`` for the hidden rows,
    ``gᵀ @ h`` for the weight). The chunk's logits are then freed. Backward only scales the
    stored gradients by the incoming one. This does the same matrix products as an unchunked
    step (no recomputation, unlike checkpointing) while holding O(C × V) instead of O(N × V).
    """

    @staticmethod
    def forward(ctx, s_h, s_w, s_b, t_h, t_w, t_b, rows_fn, temperature, chunk_size, vocab):  # noqa: D401
        n = s_h.shape[0]
        dev = s_h.device.type
        # the head products follow autocast (bf16 on accelerators) like an ordinary lm_head would
        autocast = torch.is_autocast_enabled(dev)
        mm = torch.get_autocast_dtype(dev) if autocast else s_w.dtype
        mm_t = mm if autocast else t_w.dtype  # e.g. a bf16 teacher beside a float32 student
        w, wt = s_w[:vocab].to(mm), t_w[:vocab].to(mm_t)
        b = s_b[:vocab].to(mm) if s_b.numel() else None
        bt = t_b[:vocab].to(mm_t) if t_b is not None else None
        grad_h = torch.empty(s_h.shape, dtype=torch.float32, device=s_h.device)
        grad_w = torch.zeros(s_w.shape, dtype=torch.float32, device=s_w.device)
        grad_b = torch.zeros(s_b.shape, dtype=torch.float32, device=s_b.device)
        total = torch.zeros((), dtype=torch.float32, device=s_h.device)
        fast = _CLOSED_FORM.get(getattr(rows_fn, "func", rows_fn))
        with torch.autocast(dev, enabled=False):  # dtypes are explicit below
            for start in range(0, n, chunk_size):
                h = s_h[start:start + chunk_size].to(mm)
                s_logits = F.linear(h, w, b)
                t_logits = F.linear(t_h[start:start + chunk_size].to(mm_t), wt, bt)
                if fast is not None:
                    part, g = fast(s_logits, t_logits, temperature)
                else:
                    s_logits = s_logits.detach().requires_grad_(True)
                    with torch.enable_grad():
                        part = _token_sum(rows_fn, s_logits, t_logits, temperature)
                        (g,) = torch.autograd.grad(part, s_logits)
                total += part.detach()
                if b is not None:
                    grad_b[:vocab] += g.sum(0)
                g = g.to(mm)
                grad_h[start:start + chunk_size] = g @ w
                if mm == torch.float32:
                    grad_w[:vocab].addmm_(g.t(), h)
                else:  # low-precision product (tensor cores), float32 accumulation across chunks
                    grad_w[:vocab] += g.t() @ h
                del s_logits, t_logits, g
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.n = n
        ctx.dtypes = (s_h.dtype, s_w.dtype, s_b.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out / ctx.n
        dh, dw, db = ctx.dtypes
        gb = (grad_b * scale).to(db) if grad_b.numel() else None
        return ((grad_h * scale).to(dh), (grad_w * scale).to(dw), gb,
                None, None, None, None, None, None, None)


def _params(head: nn.Module | Tensor) -> list[Tensor]:
    return [head] if isinstance(head, Tensor) else list(head.parameters())

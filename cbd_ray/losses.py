"""Distillation losses: small pure functions over logits, plus one chunking wrapper.

Conventions shared by every function here:

* ``student_logits`` and ``teacher_logits`` are ``[B, T, V]`` (any float dtype); ``mask`` is
  ``[B, T]`` bool or 0/1, True where a token counts (response tokens; prompt and padding are
  False). Only counted tokens are ever read: masked positions may hold anything, even NaN.
* Logits are upcast to float32 and divided by ``temperature`` (both models) before the softmax.
  No T² factor is applied; a caller that wants Hinton's scaling multiplies by it.
* Vocabulary entries that are ``-inf`` in a distribution (e.g. padded vocabularies) contribute
  0 where that distribution is the weighting one, instead of ``0 * inf = nan``.
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

    Where a == 0 the term is 0 by convention; both logs are zeroed there first (not just the
    product) so neither the value nor the gradient sees ``0 * (-inf)``.
    """
    zero = torch.isneginf(log_a)
    la = log_a.masked_fill(zero, 0.0)
    lb = log_b.masked_fill(zero, 0.0)
    return (la.exp().masked_fill(zero, 0.0) * (la - lb)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1−w)·b) from log-probabilities, stable (logsumexp), for 0 < w < 1.

    ``logaddexp(-inf, -inf)`` has a NaN gradient, so -inf (padded vocabulary entries) is first
    clamped to a huge finite negative; those entries carry zero weight in every KL here."""
    log_a, log_b = log_a.clamp(min=_NEG), log_b.clamp(min=_NEG)
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


_NEG = -1e30


def _rows_fkl(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl_rows(log_p, log_q)


def _rows_rkl(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl_rows(log_q, log_p)


def _rows_jsd(log_q: Tensor, log_p: Tensor, beta: float) -> Tensor:
    if beta == 0.0:
        return _kl_rows(log_p, log_q)
    if beta == 1.0:
        return _kl_rows(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)


def _rows_sfkl(log_q: Tensor, log_p: Tensor, alpha: float) -> Tensor:
    log_m = log_q if alpha == 0.0 else _log_mix(log_p, log_q, alpha)
    return _kl_rows(log_p, log_m)


def _rows_srkl(log_q: Tensor, log_p: Tensor, alpha: float) -> Tensor:
    log_m = log_p if alpha == 0.0 else _log_mix(log_q, log_p, alpha)
    return _kl_rows(log_q, log_m)


def _counted(x: Tensor, mask: Tensor) -> Tensor:
    """``[B, T, ...]`` -> ``[N, ...]``: the counted tokens only (a gather, so masked rows are
    never touched by later arithmetic)."""
    return x.reshape(-1, *x.shape[2:])[mask.reshape(-1).bool()]


def _token_sum(rows_fn: Callable[..., Tensor], s_rows: Tensor, t_rows: Tensor, temperature: float, **kw) -> Tensor:
    """Sum over rows ``[N, V]`` of the per-token divergence, float32 scalar."""
    log_q = torch.log_softmax(s_rows.float() / temperature, dim=-1)
    log_p = torch.log_softmax(t_rows.float() / temperature, dim=-1)
    return rows_fn(log_q, log_p, **kw).sum()


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


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, alpha: float = 0.1, temperature: float = 1.0) -> Tensor:
    """DistiLLM α-skew forward KL: KL(p ‖ α·p + (1−α)·q); ``alpha=0`` is forward KL.
    Shapes as :func:`forward_kl`."""
    _check_unit("alpha", alpha, closed_right=False)
    return _mean_divergence(_rows_sfkl, student_logits, teacher_logits, mask, temperature, alpha=float(alpha))


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, alpha: float = 0.1, temperature: float = 1.0) -> Tensor:
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
    is False are 0 (their tokens are never read). Computed as ``logit - logsumexp`` so no
    ``[B, T, V]`` log-softmax copy is made.
    """
    if logits.ndim != 3 or tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"token_logprobs wants logits [B, T, V] and tokens [B, T]; got {tuple(logits.shape)}, {tuple(tokens.shape)}")
    idx = tokens.long()
    if mask is not None:
        keep = mask.bool()
        idx = idx.masked_fill(~keep, 0)
    picked = logits.gather(-1, idx.unsqueeze(-1)).squeeze(-1).float()
    out = picked - torch.logsumexp(logits.float(), dim=-1)
    if mask is not None:
        out = out.masked_fill(~keep, 0.0)
    return out


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


def chunked(fn: Callable[..., Tensor], chunk_size: int) -> Callable[..., Tensor]:
    """Wrap a divergence so it works on ``chunk_size`` counted tokens at a time.

    The returned function has the same signature as ``fn``. The token axis is flattened
    (B·T), only counted tokens are kept, and ``fn`` runs on ``[1, chunk, V]`` slices; the
    per-chunk token sums are added and divided by the total count, so the result equals the
    unchunked mean (value and gradient). The float32 upcast, softmaxes and their autograd
    buffers then exist for one chunk at a time instead of the whole ``[B, T, V]``.
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
        total = None
        for start in range(0, n, chunk_size):
            s, t = s_rows[start:start + chunk_size], t_rows[start:start + chunk_size]
            ones = torch.ones(1, s.shape[0], dtype=torch.bool, device=s.device)
            part = fn(s.unsqueeze(0), t.unsqueeze(0), ones, **kw) * s.shape[0]  # mean -> sum
            total = part if total is None else total + part
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


def kd_loss_from_hidden(
    student_hidden: Tensor,
    student_head: nn.Module | Tensor,
    teacher_hidden: Tensor,
    teacher_head: nn.Module | Tensor,
    mask: Tensor,
    divergence: str = "fkl",
    chunk_size: int = 1024,
    temperature: float = 1.0,
    vocab: int | None = None,
    **div_kw,
) -> Tensor:
    """A divergence between teacher and student computed from final hidden states.

    student_hidden: ``[B, T, Hs]``; teacher_hidden: ``[B, T, Ht]``; mask: ``[B, T]``. A head is an
    ``nn.Module`` mapping ``[N, H] -> [N, V]`` (e.g. ``model.lm_head``) or a weight ``[V, H]``.
    ``vocab`` slices both heads' outputs to the first ``vocab`` entries (vocabularies that differ
    only by padding, e.g. 151936 vs 152064); without it both must have the same size.

    Only counted tokens are projected, ``chunk_size`` at a time, and each chunk runs under
    ``torch.utils.checkpoint``: its float32 logits are freed after the forward and recomputed in
    backward, so peak extra memory is O(chunk_size × V) instead of O(B × T × V) for each model.
    Equal (value and gradients) to the divergence on the full logits. Returns a float32 scalar.
    """
    if divergence not in _ROWS:
        raise ValueError(f"unknown divergence {divergence!r}; allowed: {', '.join(_ROWS)}")
    allowed_kw = {"jsd": {"beta"}, "sfkl": {"alpha"}, "srkl": {"alpha"}}.get(divergence, set())
    bad = sorted(set(div_kw) - allowed_kw)
    if bad:
        raise ValueError(f"divergence {divergence!r} takes {sorted(allowed_kw) or 'no extra keywords'}; got {bad}")
    _validate_kw(divergence, div_kw)
    _check_temperature(temperature)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if vocab is not None and (not isinstance(vocab, int) or vocab < 1):
        raise ValueError(f"vocab must be a positive int or None, got {vocab!r}")
    if student_hidden.ndim != 3 or teacher_hidden.ndim != 3 or student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(
            f"hidden states must be [B, T, H] with the same B, T; got student {tuple(student_hidden.shape)}, "
            f"teacher {tuple(teacher_hidden.shape)}"
        )
    if tuple(mask.shape) != tuple(student_hidden.shape[:2]):
        raise ValueError(f"mask must be [B, T] = {tuple(student_hidden.shape[:2])}, got {tuple(mask.shape)}")

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
    needs_grad = torch.is_grad_enabled() and (s_rows.requires_grad or t_rows.requires_grad or any(
        isinstance(p, Tensor) and p.requires_grad for p in _params(student_head) + _params(teacher_head)))
    total = None
    for start in range(0, n, chunk_size):
        s, t = s_rows[start:start + chunk_size], t_rows[start:start + chunk_size]
        if needs_grad:
            part = torch.utils.checkpoint.checkpoint(chunk_sum, s, t, use_reentrant=False)
        else:
            part = chunk_sum(s, t)
        total = part if total is None else total + part
    return total / n


def _params(head: nn.Module | Tensor) -> list[Tensor]:
    return [head] if isinstance(head, Tensor) else list(head.parameters())

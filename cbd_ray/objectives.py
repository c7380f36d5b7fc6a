"""Distillation objectives built from the pure losses of :mod:`cbd_ray.losses`.

Each objective is called as ``objective(student, teacher, batch, cfg, ctx)`` and returns
``(loss, parts)``: ``loss`` a float32 scalar, the mean over the ``parts["tokens"]`` counted
tokens (so the training loop can weight micro-batches by tokens and make the global batch
independent of the worker count), and ``parts`` a dict of floats: every loss term, ``tokens``,
``student_tokens`` and ``teacher_tokens`` (non-padding tokens each model processed, sampling
included).

``batch`` is a collated batch (:func:`cbd_ray.data.collate`): ``input_ids``,
``attention_mask``, ``loss_mask`` ``[B, T]`` and ``prompt_length`` ``[B]``, right-padded, the
loss mask 1 on response tokens. ``cfg`` is a :class:`cbd_ray.train.DistillConfig` (any object
with its fields). ``student`` may be wrapped (DDP, DeepSpeed): its forward goes through the
wrapper so gradients are synchronised; the teacher is a plain frozen model.

Objectives:
- ``sft``: cross-entropy on the responses of the data.
- ``kd``: a divergence (fkl, rkl, jsd, sfkl, srkl) between teacher and student on the
  responses of the data; the B×T×V logits are never built (``losses.kd_loss_from_hidden``).
- ``on_policy``: GKD; a fraction λ of the steps replace the responses by student samples.
- ``seqkd``: cross-entropy on teacher answers, sampled now (``seqkd_source="teacher"``) or
  pre-generated in the data (``"data"``, e.g. by ``jobs/pseudo_label.py``).
- ``minillm``: MiniLLM policy distillation (reverse KL of sequences), see :class:`MiniLLM`.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from cbd_ray import losses
from cbd_ray.data import left_padded_prompts
from cbd_ray.generate import sample

Parts = dict[str, float]
OBJECTIVES = ("sft", "kd", "on_policy", "seqkd", "minillm")


@dataclass
class StepContext:
    """What an objective needs besides models and batch.

    vocab: the vocabulary teacher and student share (logits are sliced to it for KD).
    generator: the sampling RNG (on the batch's device), seeded per run and rank.
    lm_batch: optional ``[B, L]`` LongTensor of packed pretraining text (MiniLLM's LM loss).
    eos_id: where sampled responses end: one id or several (``cbd_ray.generate.stop_ids``:
    the model's generation config and the tokenizer's; Qwen3 lists two), passed to ``sample``.
    """

    step: int = 0
    micro: int = 0
    vocab: int | None = None
    pad_id: int = 0
    eos_id: int | list[int] | None = None
    max_len: int = 512
    generator: torch.Generator | None = None
    lm_batch: Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)
    #: back-propagates a finished loss term now (the loop weights and syncs it), so an
    #: objective with two terms can free the first graph before it builds the second
    backward: Callable[[Tensor], None] | None = None


def unwrap(model: Any) -> Any:
    """The Hugging Face model inside DDP / DeepSpeed wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids ``[B, T]`` counted over real tokens (left padding gets 0), as ``generate``
    counts them; for right-padded rows this is ``arange``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final (normed) hidden states ``[B, T, H]``. ``logits_to_keep=1`` stops the model from
    projecting every position onto the vocabulary: the losses project only counted rows."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


def _div_kw(cfg: Any) -> dict[str, float]:
    if cfg.divergence == "jsd":
        return {"beta": cfg.jsd_beta}
    if cfg.divergence in ("sfkl", "srkl"):
        return {"alpha": cfg.skew_alpha}
    return {}


def _tokens(attention_mask: Tensor) -> float:
    return float(attention_mask.sum())


def _ce_rows(hidden: Tensor, head: Any, labels: Tensor, mask: Tensor, chunk: int) -> Tensor:
    """Mean cross-entropy of the counted rows only; each chunk's ``[chunk, V]`` logits are
    recomputed in backward instead of kept. hidden ``[B, T, H]``, labels/mask ``[B, T]``."""
    keep = mask.bool()
    rows, targets = hidden[keep], labels[keep]
    n = rows.shape[0]
    if n == 0:
        return hidden.sum() * 0.0

    def part(h: Tensor, y: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

    total = sum(checkpoint(part, rows[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                if torch.is_grad_enabled() else part(rows[i:i + chunk], targets[i:i + chunk])
                for i in range(0, n, chunk))
    return total / n


def ce_on(student: Any, seq: dict[str, Tensor], cfg: Any) -> tuple[Tensor, Parts]:
    """Cross-entropy of the student on the masked tokens of ``seq`` (a batch whose
    ``loss_mask`` marks the tokens to predict)."""
    h = hidden_states(student, seq["input_ids"], seq["attention_mask"])
    mask = seq["loss_mask"][:, 1:]
    head = unwrap(student).get_output_embeddings()
    loss = _ce_rows(h[:, :-1], head, seq["input_ids"][:, 1:], mask, chunk_rows(cfg, head, None, live=3))
    return loss, {"ce": float(loss.detach()), "tokens": float(mask.sum()),
                  "student_tokens": _tokens(seq["attention_mask"]), "teacher_tokens": 0.0}


def kd_on(student: Any, teacher: Any, seq: dict[str, Tensor], cfg: Any, ctx: StepContext) -> tuple[Tensor, Parts]:
    """The configured divergence between teacher and student on the masked tokens of ``seq``."""
    with torch.no_grad():
        t_h = hidden_states(teacher, seq["input_ids"], seq["attention_mask"])
    s_h = hidden_states(student, seq["input_ids"], seq["attention_mask"])
    mask = seq["loss_mask"][:, 1:].bool()
    loss = losses.kd_loss_from_hidden(
        s_h[:, :-1], unwrap(student).get_output_embeddings(), t_h[:, :-1].to(s_h.dtype),
        teacher.get_output_embeddings(), mask, divergence=cfg.divergence, chunk_size=cfg.chunk_size,
        chunk_bytes=cfg.kd_chunk_bytes,
        temperature=cfg.temperature, vocab=ctx.vocab, **_div_kw(cfg))
    n = _tokens(seq["attention_mask"])
    return loss, {f"kd_{cfg.divergence}": float(loss.detach()), "tokens": float(mask.sum()),
                  "student_tokens": n, "teacher_tokens": n}


def _sampled(model: Any, batch: dict[str, Tensor], cfg: Any, ctx: StepContext, teacher: Any = None,
             teacher_mix: float = 0.0) -> dict[str, Tensor]:
    """Responses sampled for the batch's prompts, as a left-padded sequence batch whose
    ``loss_mask`` marks the generated tokens (EOS included)."""
    ids, attn = left_padded_prompts(batch, ctx.pad_id)
    room = ctx.max_len - ids.shape[1]
    limits = [p for p in (getattr(unwrap(model).config, "n_positions", None),
                          getattr(unwrap(model).config, "max_position_embeddings", None)) if p]
    if limits:
        room = min(room, min(limits) - ids.shape[1])
    n_new = max(1, min(cfg.max_new_tokens, room))
    out = sample(unwrap(model), ids, attn, n_new, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                 eos_token_id=ctx.eos_id, pad_token_id=ctx.pad_id, do_sample=True,
                 teacher=teacher, teacher_mix=teacher_mix, generator=ctx.generator)
    seq_attn = torch.cat([attn, out.response_mask[:, out.prompt_length:].long()], dim=1)
    return {"input_ids": out.sequences, "attention_mask": seq_attn, "loss_mask": out.response_mask.long(),
            "prompt_length": batch["prompt_length"], "prompt_width": ids.shape[1], "n_new": n_new}


# ---------------------------------------------------------------------------- objectives


def sft(student: Any, teacher: Any, batch: dict[str, Tensor], cfg: Any, ctx: StepContext) -> tuple[Tensor, Parts]:
    """Cross-entropy on the data's responses (the teacher is not used)."""
    return ce_on(student, batch, cfg)


def kd(student: Any, teacher: Any, batch: dict[str, Tensor], cfg: Any, ctx: StepContext) -> tuple[Tensor, Parts]:
    """Token-level distillation on the data's responses with ``cfg.divergence``."""
    return kd_on(student, teacher, batch, cfg, ctx)


def on_policy(student: Any, teacher: Any, batch: dict[str, Tensor], cfg: Any, ctx: StepContext) -> tuple[Tensor, Parts]:
    """GKD: with probability ``cfg.on_policy_fraction`` (drawn per step, the same on every
    worker) the responses are the student's own samples; otherwise the data's."""
    coin = torch.Generator().manual_seed(cfg.seed * 1_000_003 + ctx.step)
    if float(torch.rand((), generator=coin)) < cfg.on_policy_fraction:
        seq = _sampled(student, batch, cfg, ctx)
        loss, parts = kd_on(student, teacher, seq, cfg, ctx)
        parts["student_tokens"] += float(seq["attention_mask"].sum())  # the sampling passes
        parts["on_policy"] = 1.0
        return loss, parts
    loss, parts = kd_on(student, teacher, batch, cfg, ctx)
    parts["on_policy"] = 0.0
    return loss, parts


def seqkd(student: Any, teacher: Any, batch: dict[str, Tensor], cfg: Any, ctx: StepContext) -> tuple[Tensor, Parts]:
    """Cross-entropy on teacher answers: sampled now for the batch's prompts
    (``cfg.seqkd_source == "teacher"``) or pre-generated pseudo-labels in the data."""
    if cfg.seqkd_source == "data":
        return ce_on(student, batch, cfg)
    seq = _sampled(teacher, batch, cfg, ctx)
    loss, parts = ce_on(student, seq, cfg)
    parts["teacher_tokens"] = float(seq["attention_mask"].sum())
    return loss, parts


class MiniLLM:
    """MiniLLM policy distillation: minimise the reverse KL KL(q_θ ‖ p) of whole responses
    by policy gradient (Gu et al., 2024), the paper's chain objective, computed as the
    reference implementation does (github microsoft/LMOps ``minillm/minillm``: ``sampler.py``
    for the rollout, ``losses.py`` for the loss, GPT-2 recipe
    ``scripts/gpt2/minillm/train_base_xl.sh`` and ``arguments.py`` for the defaults).

    Every ``cfg.ppo_epochs`` steps a rollout is drawn for the batch's prompts from the mix
    ``w·p + (1−w)·q_old`` (``cfg.teacher_mix``, reference ``--teacher-mixed-alpha 0.2``); the
    following ``ppo_epochs`` steps optimise on it. Per response token t (EOS included, the
    positions after it not: the reference's mask is ``token[t-1] != pad``):

    - importance weight ρ_t = q_old(y_t) / (w·p(y_t) + (1−w)·q_old(y_t)) (sampler ``w``);
    - reward r_t = clip((log p(y_t) − log q_old(y_t)) / ``reward_scaling``, ±``reward_clip``)
      (teacher reward plus the entropy reward −log q_old; recipe ``--reward-scaling 0.5
      --cliprange-reward 100``; arguments.py's default clip is 1);
    - return R_t = Σ_{t'≥t} γ^{t'−t} r_{t'} / |{counted t' ≥ t}|, γ = ``cfg.gamma`` (0.95) —
      :func:`length_normalised_returns`;
    - advantage A = whiten(R) (:func:`whiten`) over the whole response grid;
    - policy term max(−A·ρ·ratio, −A·clip(ρ·ratio, 1±ε)), ratio = q_θ(y_t)/q_old(y_t),
      ε = ``cfg.clip`` 0.2: the clip acts on ρ·ratio (:func:`ppo_term`);
    - single-step term KL(q_θ(·|y_<t) ‖ p(·|y_<t)) over the vocabulary, not ρ-weighted
      (losses.py ``_reg_loss``), on when ``cfg.single_step``;
    - pretraining term ``lm_coef`` × ((1−kd_ratio)·CE + kd_ratio·KL(p ‖ q_θ)) on
      ``ctx.lm_batch`` (reference ``pt_loss``: lm_coef 1, recipe ``--kd-ratio 0.5``), when
      the run has pretraining text (``cfg.lm_data``; ``lm_coef`` None means 1).

    Run as the authors run it (``cbd_ray.train.MINILLM_RECIPE``, the defaults of a minillm
    config): the student in eval mode for the whole step (no dropout: rollout scoring,
    rewards, ρ, the PPO ratio and the gradient step see one network; the reference's
    ``model.eval()`` for RL), a constant rate after 100 warm-up steps and weight decay 1e-6
    (``--scheduler-name constant_trm --warmup-iters 100 --weight-decay 1e-6``), a stop at
    ``steps`` or once the rollouts have taken every prompt 10 times, whichever comes first
    (``--total-iters``, ``--epochs``; the rollouts walk a seeded permutation of the prompts per
    epoch), prompts over 256 tokens dropped and counted (``--max-prompt-length``), and
    the best checkpoint by validation Rouge-L (the paper). Advantages are whitened over every
    data-parallel rank's grid together (:func:`rank_sum`), as the reference gathers its batch.

    Where this still differs from the reference: the pretraining KD term is the forward KL,
    the reference's soft cross-entropy −Σ p log q (same gradient; the value differs by the
    teacher's entropy); the whitening statistics span one rollout micro-batch of every rank,
    the reference's its PPO mini-batch over ranks (the same set when ``micro_batch`` is each
    worker's whole share); the reward's teacher log-probs use ``cfg.temperature`` (the
    reference's reward uses temperature 1; equal at the default 1); top-k/top-p masks of the
    sampler are not applied to the loss (the recipe samples with top-k 0, top-p 1); the
    validation Rouge-L that picks the checkpoint is of greedy answers to the first
    ``rouge_samples`` held-out prompts, not the whole validation set. The paper (appendix B)
    gives clip 0.2, 4 inner epochs and teacher temperature 1, which the reference's values
    agree with, and no γ, reward scale or whitening, for which the reference's defaults are
    used.

    Vocabulary rows are projected a chunk at a time (:func:`chunk_rows`) under activation
    checkpointing, so neither model's full B×T×V logits are held.
    """

    def __init__(self) -> None:
        self.rollouts: dict[int, dict[str, Tensor]] = {}

    def rollout(self, student: Any, teacher: Any, batch: dict[str, Tensor], cfg: Any, ctx: StepContext) -> dict[str, Tensor]:
        """Sample responses and score them with the old policy and the teacher (no grad)."""
        seq = _sampled(student, batch, cfg, ctx, teacher=teacher, teacher_mix=cfg.teacher_mix)
        mask = seq["loss_mask"][:, 1:].bool()
        y = seq["input_ids"][:, 1:][mask]
        with torch.no_grad():
            s_rows = hidden_states(unwrap(student), seq["input_ids"], seq["attention_mask"])[:, :-1][mask]
            t_rows = hidden_states(teacher, seq["input_ids"], seq["attention_mask"])[:, :-1][mask]
            old_lp, t_lp = _token_logprobs(unwrap(student).get_output_embeddings(), teacher.get_output_embeddings(),
                                           s_rows, t_rows, y, cfg, ctx)
            mix_lp = torch.logaddexp(t_lp + _log(cfg.teacher_mix), old_lp + _log(1.0 - cfg.teacher_mix))
            rho = torch.exp(old_lp - mix_lp)
            reward = (t_lp - old_lp) / cfg.reward_scaling
            if cfg.reward_clip:
                reward = reward.clamp(-cfg.reward_clip, cfg.reward_clip)
            adv = rollout_advantages(reward, mask, seq["prompt_width"], seq["n_new"], cfg.gamma, cfg.whiten,
                                     reduce=rank_sum())
        return {"seq": seq, "mask": mask, "targets": y, "old_lp": old_lp, "rho": rho, "adv": adv,
                "t_rows": t_rows.to(s_rows.dtype), "reward": (t_lp - old_lp).mean() if y.numel() else torch.zeros(()),
                "sample_tokens": float(seq["attention_mask"].sum())}

    def __call__(self, student: Any, teacher: Any, batch: dict[str, Tensor], cfg: Any,
                 ctx: StepContext) -> tuple[Tensor, Parts]:
        fresh = ctx.step % cfg.ppo_epochs == 0 or ctx.micro not in self.rollouts
        if fresh:
            self.rollouts[ctx.micro] = self.rollout(student, teacher, batch, cfg, ctx)
        r = self.rollouts[ctx.micro]
        seq, mask = r["seq"], r["mask"]
        h = hidden_states(student, seq["input_ids"], seq["attention_mask"])[:, :-1][mask]
        pg, single = _policy_terms(unwrap(student).get_output_embeddings(), teacher.get_output_embeddings(), h, r, cfg, ctx)
        loss = pg + (single if cfg.single_step else 0.0 * single)
        n_seq = float(seq["attention_mask"].sum())
        parts: Parts = {"pg": float(pg.detach()), "single_step_rkl": float(single.detach()),
                        "reward": float(r["reward"]), "tokens": float(h.shape[0]), "student_tokens": n_seq,
                        "teacher_tokens": n_seq if fresh else 0.0}
        if fresh:  # the sampling passes of student and teacher
            parts["student_tokens"] += r["sample_tokens"]
            parts["teacher_tokens"] += r["sample_tokens"]
        lm_coef = 1.0 if cfg.lm_coef is None else cfg.lm_coef  # reference default 1
        if lm_coef > 0 and ctx.lm_batch is not None:
            if ctx.backward is not None:  # free the policy graph before the pretraining graph exists
                ctx.backward(loss)
                loss = loss.detach()
            pt, pt_parts = pretrain_loss(student, teacher, ctx.lm_batch, cfg, ctx)
            loss = loss + lm_coef * pt
            for k, v in pt_parts.items():
                parts[k] = parts.get(k, 0.0) + v if k.endswith("_tokens") else v
        return loss, parts


def _token_logprobs(head_s: Any, head_t: Any, s_rows: Tensor, t_rows: Tensor, y: Tensor, cfg: Any,
                    ctx: StepContext) -> tuple[Tensor, Tensor]:
    """log q(y) and log p(y) ``[N]`` of the sampled tokens, a chunk of rows at a time."""
    chunk = chunk_rows(cfg, head_s, ctx, live=4)
    old, tlp = [], []
    for i in range(0, y.shape[0], chunk):
        q = torch.log_softmax(_vocab(head_s(s_rows[i:i + chunk]), ctx).float() / cfg.temperature, -1)
        p = torch.log_softmax(_vocab(head_t(t_rows[i:i + chunk]), ctx).float() / cfg.temperature, -1)
        yi = y[i:i + chunk, None]
        old.append(q.gather(-1, yi).squeeze(-1))
        tlp.append(p.gather(-1, yi).squeeze(-1))
    empty = s_rows.new_zeros(0, dtype=torch.float32)
    return (torch.cat(old) if old else empty), (torch.cat(tlp) if tlp else empty)


def _policy_terms(head_s: Any, head_t: Any, h: Tensor, r: dict[str, Tensor], cfg: Any,
                  ctx: StepContext) -> tuple[Tensor, Tensor]:
    """Mean clipped policy term and mean single-step reverse KL over the ``N`` rollout tokens.
    h: the student's hidden rows ``[N, H]`` (with grad); each chunk's logits are recomputed in
    backward (checkpoint) instead of kept."""
    n, chunk = h.shape[0], chunk_rows(cfg, head_s, ctx, live=6)

    def part(hs: Tensor, ht: Tensor, y: Tensor, old: Tensor, rho: Tensor, adv: Tensor) -> Tensor:
        q = torch.log_softmax(_vocab(head_s(hs), ctx).float() / cfg.temperature, -1)
        with torch.no_grad():
            p = torch.log_softmax(_vocab(head_t(ht), ctx).float() / cfg.temperature, -1)
        pg = ppo_term(q.gather(-1, y[:, None]).squeeze(-1), old, rho, adv, cfg.clip)
        return torch.stack([pg.sum(), single_step_kl(q, p).sum()])

    sums = h.sum() * torch.zeros(2, device=h.device)  # zero with a grad path when n == 0
    for i in range(0, n, chunk):
        args = (h[i:i + chunk], r["t_rows"][i:i + chunk], r["targets"][i:i + chunk], r["old_lp"][i:i + chunk],
                r["rho"][i:i + chunk], r["adv"][i:i + chunk])
        sums = sums + (checkpoint(part, *args, use_reentrant=False) if torch.is_grad_enabled() else part(*args))
    return sums[0] / max(n, 1), sums[1] / max(n, 1)


def pretrain_loss(student: Any, teacher: Any, lm: Tensor, cfg: Any, ctx: StepContext) -> tuple[Tensor, Parts]:
    """MiniLLM's pretraining term (reference ``losses.pt_loss``) on packed text ``lm`` ``[B, L]``:
    (1 − kd_ratio)·CE + kd_ratio·KL(p ‖ q_θ) at temperature 1, every next token counted; one
    student forward serves both parts."""
    ones = torch.ones_like(lm)
    s_h = hidden_states(student, lm, ones)[:, :-1]
    head = unwrap(student).get_output_embeddings()
    ce = _ce_rows(s_h, head, lm[:, 1:], ones[:, 1:], chunk_rows(cfg, head, ctx, live=3))
    parts: Parts = {"lm_ce": float(ce.detach()), "pt": float(ce.detach()), "student_tokens": float(lm.numel()),
                    "teacher_tokens": 0.0}
    if not cfg.kd_ratio:
        return ce, parts
    with torch.no_grad():
        t_h = hidden_states(teacher, lm, ones)[:, :-1]
    fkl = losses.kd_loss_from_hidden(
        s_h, head, t_h.to(s_h.dtype), teacher.get_output_embeddings(), ones[:, 1:].bool(), divergence="fkl",
        chunk_size=cfg.chunk_size, chunk_bytes=cfg.kd_chunk_bytes, vocab=ctx.vocab)
    loss = (1.0 - cfg.kd_ratio) * ce + cfg.kd_ratio * fkl
    parts.update({"lm_fkl": float(fkl.detach()), "pt": float(loss.detach()), "teacher_tokens": float(lm.numel())})
    return loss, parts


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _vocab(logits: Tensor, ctx: StepContext) -> Tensor:
    return logits[..., : ctx.vocab] if ctx.vocab is not None else logits


def chunk_rows(cfg: Any, head: Any, ctx: StepContext | None, live: int) -> int:
    """Rows projected onto the vocabulary at a time: ``cfg.chunk_size`` when set, else as many
    as keep ``live`` float32 ``[rows, V]`` buffers under ``cfg.kd_chunk_bytes`` (V the shared
    vocabulary, or the head's)."""
    if cfg.chunk_size:
        return int(cfg.chunk_size)
    vocab = (ctx.vocab if ctx is not None else None) or int(getattr(head, "out_features", None) or head.weight.shape[0])
    return losses.rows_for_budget(cfg.kd_chunk_bytes, vocab, live)


def length_normalised_returns(reward: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Discounted, length-normalised return per token, the reference's
    ``Loss._get_advantages_and_returns`` before whitening.

    reward, mask: ``[B, R]`` on the response grid (counted tokens first, then padding).
    Returns ``[B, R]``: R_t = Σ_{t'≥t} γ^{t'−t} r_{t'} / n_t, n_t the counted tokens at t' ≥ t
    (1 where none). E.g. r = [1, 2, 4], γ = 1: [7/3, 6/2, 4/1] = [2.33, 3, 4].
    """
    reward = reward.float() * mask
    m = mask.float()
    left = m - m.cumsum(-1) + m.sum(-1, keepdim=True)  # counted tokens from t on
    left = left.masked_fill(left == 0, 1.0)
    acc = torch.zeros_like(reward[:, 0])
    out = []
    for t in range(reward.shape[1] - 1, -1, -1):
        acc = reward[:, t] + gamma * acc
        out.append(acc)
    ret = torch.stack(out[::-1], dim=1) if out else reward
    return ret / left


def whiten(x: Tensor, eps: float = 1e-8, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(x − mean) / sqrt(var + eps) over every entry of ``x`` (unbiased variance), as the
    reference's ``utils.whiten`` (which also counts the padding of the response grid).
    Fewer than two entries: x − mean (the reference's variance would be NaN).

    ``reduce`` (e.g. :func:`rank_sum`) sums a tensor over data-parallel ranks in place: mean
    and variance are then those of every rank's ``x`` together, as the reference whitens its
    batch gathered over ranks (float64 sums and count, then the squared deviations). Every
    rank must call it, the same number of times, whatever the size of its own ``x``."""
    if reduce is None:
        if x.numel() < 2:
            return x - x.mean() if x.numel() else x
        var, mean = torch.var_mean(x)
        return (x - mean) * torch.rsqrt(var + eps)
    stats = reduce(torch.stack([x.double().sum(), x.new_tensor(float(x.numel()), dtype=torch.float64)]))
    n = float(stats[1])
    mean = stats[0] / max(n, 1.0)
    sq = reduce(((x.double() - mean) ** 2).sum().reshape(1))
    if n < 2:
        return (x.double() - mean).to(x.dtype)
    var = sq[0] / (n - 1)
    return ((x.double() - mean) * torch.rsqrt(var + eps)).to(x.dtype)


def rank_sum() -> Callable[[Tensor], Tensor] | None:
    """A sum over the ranks of the default process group (``all_reduce`` in place), when one
    is initialised with more than one rank; None otherwise (one process: nothing to sum)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None

    def reduce(t: Tensor) -> Tensor:
        dist.all_reduce(t)
        return t

    return reduce


def rollout_advantages(reward: Tensor, mask: Tensor, prompt_width: int, n_new: int, gamma: float,
                       use_whiten: bool = True, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Advantages ``[N]`` of the counted tokens of a rollout.

    reward: ``[N]`` per counted token; mask: ``[B, T-1]`` over next-token targets of the
    sampled sequences (left-padded prompts of width ``prompt_width``, then responses). Returns
    and whitening run on the response grid ``[B, n_new]``, zero-padded as the reference's
    generate pads every response to ``max_length − max_prompt_length``; with ``reduce``
    (:func:`rank_sum`) the whitening statistics are those of every rank's grid together."""
    grid = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    grid[mask] = reward.float()
    resp_r, resp_m = grid[:, prompt_width - 1:], mask[:, prompt_width - 1:]
    pad = max(0, n_new - resp_r.shape[1])
    resp_r = torch.nn.functional.pad(resp_r, (0, pad))
    resp_m = torch.nn.functional.pad(resp_m, (0, pad))
    adv = length_normalised_returns(resp_r, resp_m, gamma)
    if use_whiten:
        adv = whiten(adv, reduce=reduce)
    return adv[:, : mask.shape[1] - prompt_width + 1][mask[:, prompt_width - 1:]]


def ppo_term(logprobs: Tensor, old_logprobs: Tensor, rho: Tensor, adv: Tensor, clip: float) -> Tensor:
    """Per-token clipped policy loss ``[N]`` (reference ``Loss._pg_loss``): with
    ρ̃ = exp(log q_θ − log q_old)·ρ, max(−A·ρ̃, −A·clip(ρ̃, 1−ε, 1+ε))."""
    ratio = torch.exp(logprobs - old_logprobs) * rho
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip, 1.0 + clip))


def single_step_kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """KL(q ‖ p) per row ``[N]`` from log-probabilities ``[N, V]`` (reference ``_reg_loss``:
    cross-entropy(q, p) − entropy(q)), unweighted."""
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def build(name: str) -> Callable[..., tuple[Tensor, Parts]]:
    """The objective called ``name`` (a fresh :class:`MiniLLM` for "minillm")."""
    table: dict[str, Callable[..., tuple[Tensor, Parts]]] = {
        "sft": sft, "kd": kd, "on_policy": on_policy, "seqkd": seqkd}
    if name == "minillm":
        return MiniLLM()
    if name not in table:
        raise ValueError(f"objective {name!r} is not one of {', '.join(OBJECTIVES)}")
    return table[name]


def eval_loss(student: Any, teacher: Any, batch: dict[str, Tensor], cfg: Any, ctx: StepContext) -> dict[str, float]:
    """Held-out metrics on the data's responses (deterministic, no sampling): ``ce`` always,
    and for teacher-based objectives the divergence they minimise (``rkl`` for MiniLLM). The
    objective's own held-out loss is returned as ``loss``."""
    with torch.no_grad():
        ce, parts = ce_on(student, batch, cfg)
        out = {"ce": float(ce), "tokens": parts["tokens"]}
        if cfg.objective in ("kd", "on_policy", "minillm"):
            div = "rkl" if cfg.objective == "minillm" else cfg.divergence
            kw = {} if cfg.objective == "minillm" else _div_kw(cfg)
            t_h = hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
            s_h = hidden_states(student, batch["input_ids"], batch["attention_mask"])
            d = losses.kd_loss_from_hidden(
                s_h[:, :-1], unwrap(student).get_output_embeddings(), t_h[:, :-1].to(s_h.dtype),
                teacher.get_output_embeddings(), batch["loss_mask"][:, 1:].bool(), divergence=div,
                chunk_size=cfg.chunk_size, chunk_bytes=cfg.kd_chunk_bytes, temperature=cfg.temperature,
                vocab=ctx.vocab, **kw)
            out[div] = float(d)
            out["loss"] = float(d)
        else:
            out["loss"] = float(ce)
    return out

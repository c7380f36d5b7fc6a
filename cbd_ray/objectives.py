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
    """

    step: int = 0
    micro: int = 0
    vocab: int | None = None
    pad_id: int = 0
    eos_id: int | None = None
    max_len: int = 512
    generator: torch.Generator | None = None
    lm_batch: Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)


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
    loss = _ce_rows(h[:, :-1], unwrap(student).get_output_embeddings(), seq["input_ids"][:, 1:], mask, cfg.chunk_size)
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
            "prompt_length": batch["prompt_length"]}


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
    """MiniLLM policy distillation: minimise the reverse KL KL(q_student || p_teacher) of
    whole responses by policy gradient (Gu et al., 2024), the paper's chain objective.

    Every ``cfg.ppo_epochs`` steps a rollout is drawn for the batch's prompts from the mix
    ``w·p + (1−w)·q`` (``cfg.teacher_mix`` w = 0.2); the following ``ppo_epochs`` steps
    optimise on it (inner epochs). Per response token t:

    - importance weight ρ_t = q_old(y_t) / (w·p(y_t) + (1−w)·q_old(y_t)), corrects the mix;
    - reward r_t = log p(y_t) − log q_old(y_t);
    - advantage A_t = Σ_{t'>t} γ^{t'−t−1} r_{t'} / (number of tokens after t): the discounted,
      length-normalised future reward (the current token's part is the single-step term);
    - policy term −ρ_t · min(ratio·A_t, clip(ratio, 1±ε)·A_t), ratio = q_θ(y_t)/q_old(y_t);
    - single-step term ρ_t · KL(q_θ(·|y_<t) || p(·|y_<t)), exact over the vocabulary;
    - optional LM loss ``cfg.lm_coef`` × cross-entropy on pretraining text (``ctx.lm_batch``).

    The vocabulary rows are projected ``cfg.chunk_size`` at a time under activation
    checkpointing, so neither model's full B×T×V logits are held.
    """

    def __init__(self) -> None:
        self.rollouts: dict[int, dict[str, Tensor]] = {}

    def rollout(self, student: Any, teacher: Any, batch: dict[str, Tensor], cfg: Any, ctx: StepContext) -> dict[str, Tensor]:
        """Sample responses and score them with the old policy and the teacher (no grad)."""
        seq = _sampled(student, batch, cfg, ctx, teacher=teacher, teacher_mix=cfg.teacher_mix)
        head_s, head_t = unwrap(student).get_output_embeddings(), teacher.get_output_embeddings()
        mask = seq["loss_mask"][:, 1:].bool()
        targets = seq["input_ids"][:, 1:]
        with torch.no_grad():
            s_rows = hidden_states(unwrap(student), seq["input_ids"], seq["attention_mask"])[:, :-1][mask]
            t_rows = hidden_states(teacher, seq["input_ids"], seq["attention_mask"])[:, :-1][mask]
            y = targets[mask]
            old, tlp, mix = [], [], []
            for i in range(0, y.shape[0], cfg.chunk_size):
                q = torch.log_softmax(_vocab(head_s(s_rows[i:i + cfg.chunk_size]), ctx).float() / cfg.temperature, -1)
                p = torch.log_softmax(_vocab(head_t(t_rows[i:i + cfg.chunk_size]), ctx).float() / cfg.temperature, -1)
                yi = y[i:i + cfg.chunk_size, None]
                qy, py = q.gather(-1, yi).squeeze(-1), p.gather(-1, yi).squeeze(-1)
                old.append(qy)
                tlp.append(py)
                mix.append(torch.logaddexp(py + _log(cfg.teacher_mix), qy + _log(1.0 - cfg.teacher_mix)))
            old_lp, t_lp, mix_lp = torch.cat(old), torch.cat(tlp), torch.cat(mix)
            rho = torch.exp(old_lp - mix_lp)
            # rewards back on the [B, T-1] grid to accumulate returns along each row
            reward = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            reward[mask] = t_lp - old_lp
            adv = future_rewards(reward, mask, cfg.gamma)
        n = float(seq["attention_mask"].sum())
        return {"seq": seq, "mask": mask, "targets": y, "old_lp": old_lp, "rho": rho, "adv": adv[mask],
                "t_rows": t_rows.to(s_rows.dtype), "reward": (t_lp - old_lp).mean() if y.numel() else torch.zeros(()),
                "sample_tokens": n}

    def __call__(self, student: Any, teacher: Any, batch: dict[str, Tensor], cfg: Any,
                 ctx: StepContext) -> tuple[Tensor, Parts]:
        fresh = ctx.step % cfg.ppo_epochs == 0 or ctx.micro not in self.rollouts
        if fresh:
            self.rollouts[ctx.micro] = self.rollout(student, teacher, batch, cfg, ctx)
        r = self.rollouts[ctx.micro]
        seq, mask = r["seq"], r["mask"]
        h = hidden_states(student, seq["input_ids"], seq["attention_mask"])[:, :-1][mask]
        head_s, head_t = unwrap(student).get_output_embeddings(), teacher.get_output_embeddings()
        n = h.shape[0]
        eps, chunk = cfg.clip, cfg.chunk_size

        def part(hs: Tensor, ht: Tensor, y: Tensor, old: Tensor, rho: Tensor, adv: Tensor) -> Tensor:
            logits = _vocab(head_s(hs), ctx).float() / cfg.temperature
            q = torch.log_softmax(logits, -1)
            with torch.no_grad():
                p = torch.log_softmax(_vocab(head_t(ht), ctx).float() / cfg.temperature, -1)
            ratio = torch.exp(q.gather(-1, y[:, None]).squeeze(-1) - old)
            pg = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
            single = (q.exp() * (q - p)).sum(-1)
            return torch.stack([(rho * pg).sum(), (rho * single).sum()])

        sums = torch.zeros(2, device=h.device)
        for i in range(0, n, chunk):
            args = (h[i:i + chunk], r["t_rows"][i:i + chunk], r["targets"][i:i + chunk], r["old_lp"][i:i + chunk],
                    r["rho"][i:i + chunk], r["adv"][i:i + chunk])
            sums = sums + checkpoint(part, *args, use_reentrant=False)
        pg, single = sums[0] / max(n, 1), sums[1] / max(n, 1)
        loss = pg + (single if cfg.single_step else 0.0 * single)
        parts: Parts = {"pg": float(pg.detach()), "single_step_rkl": float(single.detach()),
                        "reward": float(r["reward"]), "tokens": float(n),
                        "student_tokens": float(seq["attention_mask"].sum()),
                        "teacher_tokens": float(seq["attention_mask"].sum()) if fresh else 0.0}
        if fresh:  # the sampling passes of student and teacher
            parts["student_tokens"] += r["sample_tokens"]
            parts["teacher_tokens"] += r["sample_tokens"]
        if cfg.lm_coef > 0 and ctx.lm_batch is not None:
            lm = ctx.lm_batch
            ones = torch.ones_like(lm)
            lm_loss, _ = ce_on(student, {"input_ids": lm, "attention_mask": ones, "loss_mask": ones}, cfg)
            loss = loss + cfg.lm_coef * lm_loss
            parts["lm"] = float(lm_loss.detach())
            parts["student_tokens"] += float(lm.numel())
        return loss, parts


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _vocab(logits: Tensor, ctx: StepContext) -> Tensor:
    return logits[..., : ctx.vocab] if ctx.vocab is not None else logits


def future_rewards(reward: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Discounted, length-normalised future reward per token.

    reward, mask: ``[B, T]``. Returns ``[B, T]``: at a counted position t,
    Σ_{t'>t, counted} γ^{k(t')−k(t)−1} r_{t'} divided by the number of counted tokens after t
    (0 for the last token), k being the index among counted tokens.
    """
    reward = reward * mask
    b, t = reward.shape
    ret = torch.zeros_like(reward)
    acc = torch.zeros(b, dtype=reward.dtype, device=reward.device)
    count = torch.zeros(b, dtype=reward.dtype, device=reward.device)
    for j in range(t - 1, -1, -1):
        m = mask[:, j].to(reward.dtype)
        # value after position j, for counted positions (unchanged across padding)
        ret[:, j] = torch.where(count > 0, acc / count.clamp(min=1), torch.zeros_like(acc)) * m
        acc = torch.where(m > 0, reward[:, j] + gamma * acc, acc)
        count = count + m
    return ret


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
                chunk_size=cfg.chunk_size, temperature=cfg.temperature, vocab=ctx.vocab, **kw)
            out[div] = float(d)
            out["loss"] = float(d)
        else:
            out["loss"] = float(ce)
    return out

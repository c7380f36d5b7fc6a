"""Short language-model fine-tuning with a held-out loss curve: the common budget every
initialisation gets in the comparisons (cbd_ray.reproduce) and the recovery training of an
α trial (cbd_ray.stages.tune).

Plain torch, one process: at the tiny scale a Ray Train run per model would cost more in
worker start-up than the training itself. Every call with the same ``seed`` draws the same
batches, so two initialisations of one shape see exactly the same tokens in the same order.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from cbd_ray.cards import fit_tokenizer
from cbd_ray.errors import CBDError

EvalHook = Callable[[int, float], None]


def encode_text(tokenizer: Any, text: str) -> Any:
    """Token ids of ``text``: LongTensor [n_tokens]."""
    import torch

    ids = tokenizer(text)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(ids: Any, seq_len: int, windows: int) -> Any:
    """Non-overlapping windows spread evenly over ``ids``: LongTensor [n, seq_len + 1]."""
    import torch

    span = seq_len + 1
    n_max = ids.numel() // span
    if n_max < 1:
        raise CBDError(f"held-out text has {ids.numel()} tokens: fewer than one window of {span}")
    n = min(windows, n_max)
    starts = [round(i * (n_max - 1) / max(1, n - 1)) * span for i in range(n)]
    return torch.stack([ids[s:s + span] for s in starts])


def fit_seq_len(model: Any, seq_len: int) -> int:
    """``seq_len`` capped so a window of ``seq_len + 1`` tokens fits the model's positions."""
    cfg = model.config
    positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", seq_len + 1)
    return min(seq_len, positions - 1)


def text_loss(model: Any, tokenizer: Any, text: str, seq_len: int, windows: int) -> float:
    """Held-out loss of ``model`` on ``windows`` fixed windows of ``text``: the score an α
    trial reports before recovery (cbd_ray.stages.tune) and the grid's α search uses
    (cbd_ray.alpha_search), so both rank blends the same way."""
    ev = eval_windows(encode_text(tokenizer, text), fit_seq_len(model, seq_len), windows)
    return heldout_loss(model, ev.to(next(model.parameters()).device))


def heldout_loss(model: Any, windows: Any, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over ``windows`` [n, T+1]."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in range(0, windows.shape[0], batch_size):
            x = windows[b:b + batch_size]
            out = model(input_ids=x, labels=x)  # HF shifts: T predictions a row
            n = x.shape[0] * (x.shape[1] - 1)
            total += float(out.loss) * n
            count += n
    if was_training:
        model.train()
    return total / count


def finetune_lm(model_dir: str | Path, train_text: str, eval_text: str, steps: int, batch_size: int = 8,
                seq_len: int = 64, lr: float = 1e-3, eval_every: int = 10, eval_windows_n: int = 16,
                seed: int = 0, warmup: float = 0.1, out_dir: str | Path | None = None,
                on_eval: EvalHook | None = None, log: Callable[[str], None] | None = None,
                device: str = "auto") -> dict[str, Any]:
    """Next-token training of the model in ``model_dir`` on ``train_text`` for ``steps`` steps.

    Batches: LongTensor [batch_size, seq_len + 1] of random windows drawn with ``seed``.
    AdamW, linear warm-up over ``warmup`` of the steps then cosine decay to 5%.
    The held-out loss on fixed windows of ``eval_text`` is measured before the first step
    and every ``eval_every`` steps (and after the last); ``on_eval(step, loss)`` is called
    each time (Ray Tune reports through it). ``steps=0`` only evaluates. ``device``: auto
    (CUDA when available, else CPU), cpu, cuda or npu (cbd_ray.devices).

    Returns {"train_curve": [[step, loss]], "eval_curve": [[step, loss]], "initial_eval",
    "final_eval", "tokens", "seconds"}; saves the model to ``out_dir`` when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if steps < 0 or batch_size < 1 or seq_len < 2 or eval_every < 1:
        raise CBDError(f"finetune: steps={steps} (>= 0), batch_size={batch_size} (>= 1), seq_len={seq_len} (>= 2), "
                       f"eval_every={eval_every} (>= 1) out of range")
    from cbd_ray.devices import resolve

    say = log or (lambda s: None)
    dev = resolve(device).torch_device()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=torch.float32).to(dev)
    seq_len = fit_seq_len(model, seq_len)
    train_ids, eval_ids = encode_text(tok, train_text), encode_text(tok, eval_text)
    if train_ids.numel() < seq_len + 2:
        raise CBDError(f"training text has {train_ids.numel()} tokens: fewer than one window of {seq_len + 1}")
    ev = eval_windows(eval_ids, seq_len, eval_windows_n).to(dev)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, int(steps * warmup))

    def lr_at(s: int) -> float:
        return lr * min(1.0, (s + 1) / warm) * max(0.05, 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))

    t0 = time.perf_counter()
    eval_curve: list[list[float]] = []
    train_curve: list[list[float]] = []

    def evaluate(step: int) -> None:
        loss = heldout_loss(model, ev)
        eval_curve.append([step, loss])
        say(f"finetune {Path(model_dir).name}: step {step}/{steps} held-out loss {loss:.4f}")
        if on_eval is not None:
            on_eval(step, loss)

    evaluate(0)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, train_ids.numel() - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([train_ids[s:s + seq_len + 1] for s in starts.tolist()]).to(dev)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_curve.append([step + 1, float(out.loss.detach())])
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            evaluate(step + 1)
    model.eval()
    if out_dir is not None:
        model.cpu().save_pretrained(out_dir, safe_serialization=True)
        fit_tokenizer(tok, model.config).save_pretrained(out_dir)
    return {"train_curve": train_curve, "eval_curve": eval_curve, "initial_eval": eval_curve[0][1],
            "final_eval": eval_curve[-1][1], "tokens": steps * batch_size * seq_len,
            "seconds": round(time.perf_counter() - t0, 3)}


def steps_to_reach(curve: list[list[float]] | list[tuple[float, float]], level: float) -> float | None:
    """The first step at which ``curve`` ([[step, loss], ...], steps ascending) is at or below
    ``level``, interpolated linearly between measured points; None when it never gets there."""
    prev: tuple[float, float] | None = None
    for s, v in curve:
        if v <= level:
            if prev is None or prev[1] == v:
                return float(s)
            ps, pv = prev
            return float(ps + (s - ps) * (pv - level) / (pv - v))
        prev = (float(s), float(v))
    return None

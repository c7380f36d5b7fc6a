"""Evaluation of causal language models: multiple choice, generation, perplexity.

Scoring follows lm-evaluation-harness so numbers are comparable with published ones:

* **Multiple choice**: each choice is a ``(context, continuation)`` request whose score is
  the summed log-probability of the continuation tokens given the context. ``acc`` takes
  the arg-max; ``acc_norm`` divides each score by the character length of the choice text
  first (so long answers are not punished for having more tokens), as lm-eval's code does;
  ``acc_bytes`` divides by its UTF-8 byte length instead (the two differ on non-ASCII
  choices, e.g. some HellaSwag endings). Tokenisation matches
  lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation, the
  continuation tokens are those of ``encode(context + continuation)`` past ``encode(context)``.
* **Generation**: greedy answers, Rouge-L F-measure (``rouge-score``, stemming on).
* **Perplexity**: strided windows over held-out text; every token after the first is
  scored exactly once with as much left context as a window allows.

Requests are batched: left-padded rows (ends aligned, so only the last positions'
logits are computed with ``logits_to_keep``), longest first, and requests whose model
input is identical share one row (MMLU's " A".." D" or BoolQ's " no"/" yes" after one
context cost one forward, not four or two).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cbd_ray.errors import CBDError, CheckpointError
from cbd_ray.tasks import (
    TASKS,
    GenExample,
    MCExample,
    Request,
    Task,
    load_examples,
    parse_tasks,
)

log = logging.getLogger(__name__)

__all__ = [
    "TASKS", "Request", "MCExample", "GenExample", "evaluate_model", "evaluate_loaded",
    "load_model", "score_choices", "mc_metrics", "rouge_l", "perplexity", "generate_greedy",
]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def _max_length(model: Any, max_length: int | None = None) -> int:
    """The model's context length (config.n_positions / max_position_embeddings)."""
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    return min(limit, max_length) if max_length else limit


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: (context tokens, continuation tokens).

    Trailing whitespace of the context is moved to the continuation, and the continuation's
    tokens are read off the encoding of the whole string, so a BPE merge across the
    boundary is tokenised as the model would see it in running text. An empty context is
    replaced by the end-of-text token (the model needs one position to predict from)."""
    if not context:
        prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        if prefix is None:
            raise CBDError("an empty context needs an eos or bos token in the tokenizer")
        return [prefix], _encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return tid
    return 0


def _forward_last(model: Any, rows: list[list[int]], keep: int, pad_id: int) -> Any:
    """Logits of the last ``keep`` positions of each row.

    rows: B lists of token ids (lengths may differ) -> float32 tensor [B, keep, V].
    Rows are left-padded so their last tokens align; position ids restart at 0 at the first
    real token so padding changes nothing but cost."""
    import torch

    device = next(model.parameters()).device
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False)
        logits = out.logits
    except TypeError:  # a model class without logits_to_keep
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    return logits[:, -keep:].float()


def length_buckets(order: Sequence[int], lengths: Sequence[int], batch_size: int,
                   max_padding: float = 0.1) -> list[list[int]]:
    """Split ``order`` (indices sorted by decreasing length) into batches of at most
    ``batch_size`` whose rows are at least (1 - max_padding) times the batch's longest.

    Padded positions cost as much as real ones (attention quadratically), so on CPUs a
    batch of mixed lengths can be slower than one row at a time; with this rule padding
    stays under ``max_padding`` of a batch's positions."""
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and lengths[i] >= (1 - max_padding) * lengths[batches[-1][0]]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def score_requests(model: Any, tokenizer: Any, requests: Sequence[Request], batch_size: int = 16,
                   max_length: int | None = None, progress: bool = False,
                   desc: str = "scoring", stats: dict[str, int] | None = None) -> list[tuple[float, bool]]:
    """(sum log-likelihood, is_greedy) of each request's continuation given its context.

    One forward per batch of ``batch_size`` distinct model inputs. ``stats["cut_idx"]`` (when
    ``stats`` is given) lists the requests whose context was cut on the left to fit the window."""
    import torch

    if batch_size < 1:
        raise CBDError(f"batch_size must be >= 1, got {batch_size}")
    L = _max_length(model, max_length)
    rows: dict[tuple[int, ...], int] = {}
    plan: list[tuple[int, list[int]]] = []  # per request: (row index, continuation tokens)
    for req in requests:
        ctx, cont = encode_pair(tokenizer, req.context, req.continuation)
        if not cont:
            plan.append((-1, []))
            continue
        cont = cont[-L:]  # a continuation longer than the window keeps its end
        # The model sees context + continuation minus its last token, cut on the left to the window.
        if stats is not None and len(ctx) + len(cont) > L + 1:
            stats.setdefault("cut_idx", []).append(len(plan))
        inp = tuple((ctx + cont)[-(L + 1):][:-1])
        plan.append((rows.setdefault(inp, len(rows)), cont))
    row_list = list(rows)
    # Which continuation length each row must keep logits for (the longest using it).
    keep_of = [1] * len(row_list)
    for r, cont in plan:
        if r >= 0:
            keep_of[r] = max(keep_of[r], len(cont))
    order = sorted(range(len(row_list)), key=lambda i: -len(row_list[i]))  # longest first: OOM shows at once
    results: list[tuple[float, bool]] = [(0.0, True)] * len(plan)
    by_row: dict[int, list[int]] = {}
    for qi, (r, _) in enumerate(plan):
        if r >= 0:
            by_row.setdefault(r, []).append(qi)
    pad_id = _pad_id(tokenizer)
    bar = _progress(len(plan), desc, progress)
    with torch.inference_mode():
        for batch in length_buckets(order, [len(r) for r in row_list], batch_size):
            keep = max(keep_of[i] for i in batch)
            logp = torch.log_softmax(_forward_last(model, [list(row_list[i]) for i in batch], keep, pad_id), -1)
            for j, ri in enumerate(batch):
                for qi in by_row[ri]:
                    cont = plan[qi][1]
                    lp = logp[j, keep - len(cont):]  # [len(cont), V], position t predicts cont[t]
                    target = torch.tensor(cont, device=lp.device)
                    ll = lp.gather(-1, target[:, None]).sum().item()
                    greedy = bool((lp.argmax(-1) == target).all().item())
                    results[qi] = (ll, greedy)
                bar.update(len(by_row[ri]))
    bar.close()
    return results


def score_choices(model: Any, tokenizer: Any, requests: Sequence[Request], batch_size: int = 16,
                  max_length: int | None = None, progress: bool = False,
                  stats: dict[str, int] | None = None) -> list[float]:
    """Summed log-likelihood of each request's continuation given its context (nats)."""
    return [ll for ll, _ in score_requests(model, tokenizer, requests, batch_size, max_length, progress,
                                           stats=stats)]


def mc_metrics(examples: Sequence[MCExample], scores: Sequence[float]) -> dict[str, float]:
    """acc, acc_norm (score / choice characters), acc_bytes (score / choice UTF-8 bytes)
    and their standard errors.

    scores: flat list, the requests of every example in order."""
    n = len(examples)
    if n == 0:
        raise CBDError("no examples to score")
    n_req = sum(len(ex.requests) for ex in examples)
    if n_req != len(scores):
        raise CBDError(f"{n} examples hold {n_req} requests but {len(scores)} scores were given")
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    i = 0
    for ex in examples:
        s = scores[i:i + len(ex.requests)]
        i += len(ex.requests)
        # first maximum on ties, as numpy.argmax in lm-eval
        for name, div in (("acc", None), ("acc_norm", ex.norm_chars), ("acc_bytes", ex.norm_bytes)):
            pick = max(range(len(s)), key=lambda k: s[k] / max(div[k], 1) if div else s[k])
            hits[name] += pick == ex.gold
    out: dict[str, float] = {}
    for name, count in hits.items():
        p = count / n
        out[name] = p
        out[f"{name}_stderr"] = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0
    return out


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure (``rouge-score``, Porter stemming) of one prediction; 0..1."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


_SCORER = None


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def generate_greedy(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 128,
                    batch_size: int = 8, progress: bool = False, stats: dict[str, int] | None = None) -> list[str]:
    """Greedy answers to ``prompts`` (text after the prompt up to end-of-text).

    Prompts are tokenised without special tokens, left-cut to fit ``max_new_tokens`` into
    the model's context (``stats["cut"]`` counts them), sorted by length so batches pad
    little, and left-padded."""
    import torch

    L = _max_length(model)
    if max_new_tokens < 1:
        raise CBDError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens > L // 2:
        # A short-context (tiny) model: keep half its window for the prompt.
        log.warning("max_new_tokens=%d capped to %d for a %d-token context", max_new_tokens, L // 2, L)
        max_new_tokens = L // 2
    full = [_encode(tokenizer, p) for p in prompts]
    encoded = [e[-(L - max_new_tokens):] for e in full]
    if stats is not None:
        stats["cut"] = stats.get("cut", 0) + sum(len(e) > L - max_new_tokens for e in full)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    from cbd_ray.generate import sample, stop_ids

    pad_id, eos_ids = _pad_id(tokenizer), stop_ids(model, tokenizer)  # every end-of-turn id the model uses
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(prompts)
    bar = _progress(len(prompts), "generating", progress)
    with torch.inference_mode():
        for idx in length_buckets(order, [len(e) for e in encoded], batch_size):
            rows = [encoded[i] for i in idx]
            T = max(len(r) for r in rows)
            ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, T - len(r):] = torch.tensor(r)
                mask[j, T - len(r):] = 1
            ids, mask = ids.to(device), mask.to(device)
            seq = sample(model, ids, mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos_ids, pad_token_id=pad_id).sequences
            for j, i in enumerate(idx):
                new = seq[j, T:].tolist()
                ends = [k for k, t in enumerate(new) if t in eos_ids]
                if ends:
                    new = new[: ends[0]]
                answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
            bar.update(len(idx))
    bar.close()
    return answers


def _encode_prefix(tokenizer: Any, text: str, need: int | None, margin: int = 64) -> list[int]:
    """The first ``need`` tokens of ``text`` (all when None) without tokenising all of it.

    A prefix of the text is encoded, doubling until it yields ``need + margin`` tokens: BPE
    splits words independently, so tokens well before the cut equal those of the whole text."""
    if need is None:
        return _encode(tokenizer, text)
    chars = 8 * (need + margin)
    while True:
        ids = _encode(tokenizer, text[:chars])
        if chars >= len(text):
            return ids
        if len(ids) >= need + margin:
            return ids[:need]
        chars *= 2


def perplexity(model: Any, tokenizer: Any, text: str, max_length: int | None = None,
               stride: int | None = None, batch_size: int = 4, max_windows: int | None = None,
               progress: bool = False) -> dict[str, float]:
    """Token-level perplexity of ``text`` with strided windows.

    Windows of ``max_length`` tokens (default: the model's context) start every ``stride``
    tokens (default: half a window); each scores only the tokens the previous window did
    not, so every token after the first is scored once, with at least
    ``max_length - stride`` tokens of context except near the start.
    Returns {"ppl", "nll" (mean per token, nats), "tokens", "windows"}."""
    import torch

    L = _max_length(model, max_length)
    stride = stride or max(1, L // 2)
    if not 0 < stride <= L:
        raise CBDError(f"stride must be in 1..{L}, got {stride}")
    ids = _encode_prefix(tokenizer, text, L + stride * (max_windows - 1) + 1 if max_windows else None)
    if len(ids) < 2:
        raise CBDError("perplexity needs a text of at least 2 tokens")
    windows: list[tuple[int, int, int]] = []  # (begin, end, first scored index)
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + L, len(ids))
        first = max(prev_end, begin + 1)
        if end > first:
            windows.append((begin, end, first))
        prev_end = end
        if end == len(ids) or (max_windows and len(windows) >= max_windows):
            break
    total_nll, total_tok = 0.0, 0
    pad_id = _pad_id(tokenizer)
    bar = _progress(len(windows), "perplexity", progress)
    with torch.inference_mode():
        for b in range(0, len(windows), batch_size):
            batch = windows[b:b + batch_size]
            rows = [ids[s:e] for s, e, _ in batch]
            # Tokens f..e-1 are predicted by positions f-1..e-2: the last n+1 positions but the
            # final one (f >= s+1, so n+1 never exceeds the row's length).
            K = max(e - f for _, e, f in batch) + 1
            logits = _forward_last(model, rows, K, pad_id)
            for j, (s, e, f) in enumerate(batch):
                n = e - f
                lp = torch.log_softmax(logits[j, K - n - 1:K - 1], -1)
                tgt = torch.tensor(ids[f:e], device=lp.device)
                total_nll -= lp.gather(-1, tgt[:, None]).sum().item()
                total_tok += n
            bar.update(len(batch))
    bar.close()
    nll = total_nll / total_tok
    return {"ppl": math.exp(nll), "nll": nll, "tokens": total_tok, "windows": len(windows)}


# --------------------------------------------------------------------------------------
# Models and whole tasks
# --------------------------------------------------------------------------------------


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """Cheap checks of a model directory before anything is loaded: it exists, has a
    config.json and safetensors weights. Raises CheckpointError naming what is missing."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory {d} does not exist")
    if not (d / "config.json").is_file():
        raise CheckpointError(f"model directory {d} does not load: no config.json")
    if not list(d.glob("*.safetensors")):
        raise CheckpointError(f"model directory {d} does not load: no *.safetensors weights "
                              f"(only safetensors are loaded)")
    return d


def load_model(model_dir: str | os.PathLike, device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) of a Hugging Face model directory, safetensors only, eval mode.

    Raises CheckpointError with the reason when the directory does not hold a loadable
    model (no config, no safetensors weights, no tokenizer, or loading fails)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cbd_ray.devices import resolve

    d = check_model_dir(model_dir)
    spec = resolve(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(d, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"model directory {d} does not load: its tokenizer fails ({exc})") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            d, use_safetensors=True, trust_remote_code=False,
            dtype=torch.float32 if spec.kind == "cpu" else torch.bfloat16,
        )
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"model directory {d} does not load: {type(exc).__name__}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(spec.torch_device()).eval(), tokenizer


def evaluate_loaded(model: Any, tokenizer: Any, tasks: str | list[str], data_dir: str | os.PathLike | None = None,
                    limit: int | None = None, batch_size: int = 16, shots: int = 0, max_new_tokens: int = 128,
                    progress: bool = True, model_name: str = "", prepared: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Evaluate an in-memory model on ``tasks`` (names, or ``name:PATH``).

    Returns one dict per task: {"task", "metrics", "n", "model", "seconds"}; MMLU adds
    "shots" and "by_subject" (accuracy per subject), Dolly "by_category" (Rouge-L)."""
    parsed = parse_tasks(tasks)
    if prepared is None:
        prepared = prepare_tasks(parsed, data_dir, limit, shots)
    results = []
    for task, path in parsed:
        t0 = time.perf_counter()
        spec = task_spec(task, path)
        data = prepared[spec]
        metrics, n, extra = _run_task(model, tokenizer, task, data, batch_size, max_new_tokens, progress, limit)
        result = {"task": spec, "metrics": metrics, "n": n, "model": model_name,
                  "seconds": round(time.perf_counter() - t0, 3)}
        if task.name == "mmlu":
            result["shots"] = shots
        result.update(extra)
        results.append(result)
        if progress:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith("_stderr"))
            print(f"[evaluate] {model_name or 'model'} {spec}: {shown} (n={n})", file=sys.stderr, flush=True)
    return results


def task_spec(task: Task, path: str | None) -> str:
    """The task's name as given: ``name`` or ``name:PATH``."""
    return task.name if path is None else f"{task.name}:{path}"


def prepare_tasks(parsed: list[tuple[Task, str | None]], data_dir: str | os.PathLike | None,
                  limit: int | None, shots: int) -> dict[str, Any]:
    """Read every task's data up front (bad files fail before any model is loaded)."""
    return {task_spec(t, p): load_examples(t, data_dir, p, limit, shots) for t, p in parsed}


def _run_task(model: Any, tokenizer: Any, task: Task, data: Any, batch_size: int, max_new_tokens: int,
              progress: bool, limit: int | None) -> tuple[dict[str, float], int, dict[str, Any]]:
    """(metrics, examples scored, extra result fields such as per-subject accuracy)."""
    stats: dict[str, Any] = {"cut": 0}
    if task.kind == "multiple_choice":
        reqs = [r for ex in data for r in ex.requests]
        scores = score_choices(model, tokenizer, reqs, batch_size=batch_size, progress=progress, stats=stats)
        owner = [k for k, ex in enumerate(data) for _ in ex.requests]  # request -> its example
        stats["cut"] = len({owner[q] for q in stats.get("cut_idx", [])})
        _log_cut(task.name, stats["cut"], len(data), model)
        # Only the task's own metrics: WinoGrande's continuations are identical and MMLU's
        # letters one character each, so acc_norm would just repeat acc there.
        metrics = {k: v for k, v in mc_metrics(data, scores).items() if k.removesuffix("_stderr") in task.metrics}
        extra: dict[str, Any] = {"prompts_cut": stats["cut"]}
        if task.name == "mmlu":
            by = _accuracy_by(data, scores, "subject")
            metrics["acc_subject_macro"] = sum(by.values()) / len(by)
            extra["by_subject"] = by
        return metrics, len(data), extra
    if task.kind == "generation":
        preds = generate_greedy(model, tokenizer, [ex.prompt for ex in data], max_new_tokens=max_new_tokens,
                                batch_size=batch_size, progress=progress, stats=stats)
        _log_cut(task.name, stats["cut"], len(data), model)
        scores = [rouge_l(p, ex.reference) for p, ex in zip(preds, data)]
        by: dict[str, list[float]] = {}
        for sc, ex in zip(scores, data):
            if ex.meta.get("category"):
                by.setdefault(ex.meta["category"], []).append(sc)
        extra = {"prompts_cut": stats["cut"], **({"by_category": {c: sum(v) / len(v) for c, v in sorted(by.items())}}
                                                 if by else {})}
        return {"rougeL": sum(scores) / len(scores)}, len(scores), extra
    res = perplexity(model, tokenizer, data, batch_size=max(1, batch_size // 4), max_windows=limit,
                     progress=progress)
    return {"ppl": res["ppl"], "nll": res["nll"], "windows": res["windows"]}, int(res["tokens"]), {}


def _log_cut(task: str, cut: int, total: int, model: Any) -> None:
    """One line per task: how many prompts lost their start to the model's window."""
    level = logging.WARNING if cut else logging.INFO
    log.log(level, "%s: %d of %d prompts cut on the left to the model's %d-token window", task, cut, total,
            _max_length(model))


def _accuracy_by(examples: Sequence[MCExample], scores: Sequence[float], key: str) -> dict[str, float]:
    """Accuracy per value of ``example.meta[key]`` (MMLU: per subject), keys sorted."""
    hits: dict[str, list[int]] = {}
    i = 0
    for ex in examples:
        s = scores[i:i + len(ex.requests)]
        i += len(ex.requests)
        hits.setdefault(ex.meta.get(key, ""), []).append(int(max(range(len(s)), key=s.__getitem__) == ex.gold))
    return {k: sum(h) / len(h) for k, h in sorted(hits.items())}


def evaluate_model(model_dir: str | os.PathLike, tasks: str | list[str], data_dir: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int = 16, device: str = "auto", progress: bool = True,
                   shots: int = 0, max_new_tokens: int = 128) -> list[dict[str, Any]]:
    """Load ``model_dir`` and evaluate it on ``tasks``.

    Task names, data files and the model directory are all checked before the model is
    loaded. Returns one {"task", "metrics", "n", "model", "seconds"} per task."""
    parsed = parse_tasks(tasks)
    if batch_size < 1 or max_new_tokens < 1:
        raise CBDError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    check_model_dir(model_dir)
    prepared = prepare_tasks(parsed, data_dir, limit, shots)
    model, tokenizer = load_model(model_dir, device)
    return evaluate_loaded(model, tokenizer, [task_spec(t, p) for t, p in parsed], limit=limit, batch_size=batch_size,
                           shots=shots, max_new_tokens=max_new_tokens, progress=progress,
                           model_name=str(model_dir), prepared=prepared)

"""The chain's ``data`` stage and the files it writes, which every later stage reads.

``<run>/data/`` holds the instruction records split into ``train.jsonl`` and ``eval.jsonl``
(Dolly schema), and the plain text cut into ``text_train.txt`` (pretraining, calibration),
``text_val.txt`` (``data.val_fraction``: the grid's α search only; neither trained on nor
reported) and ``text_heldout.txt`` (what the evaluation reports).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from cbd_ray.errors import CBDError
from cbd_ray.pipeline import StageContext
from cbd_ray.schema import ChainConfig


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSONL file the data stage wrote (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_records(spec: str, limit: int | None, builtin_count: int, seed: int) -> list[dict[str, Any]]:
    """Instruction records: ``builtin`` (from Python's docs), a local JSONL/Parquet file or a
    hub dataset name (cbd_ray.data.read_instructions)."""
    if spec == "builtin":
        from cbd_ray.tiny import builtin_instructions

        recs = builtin_instructions(builtin_count, seed=seed)
        return recs[:limit] if limit else recs
    from cbd_ray.data import read_instructions

    return [dict(r) for r in read_instructions(spec, limit)]


def data_stage(cfg: ChainConfig) -> Callable[[StageContext], dict[str, Any]]:
    def fn(ctx: StageContext) -> dict[str, Any]:
        from cbd_ray.stages.models import read_text_source
        from cbd_ray.storage import atomic_write_text

        d = cfg.data
        ctx.out.mkdir(parents=True)
        recs = read_records(d.instructions, d.limit, d.builtin_count, cfg.run.seed)
        if d.eval_instructions:
            train, evalr = recs, read_records(d.eval_instructions, None, d.builtin_count, cfg.run.seed + 1)
        else:
            n_eval = max(1, int(len(recs) * d.eval_fraction))
            train, evalr = recs[:-n_eval], recs[-n_eval:]
        if not train or not evalr:
            raise CBDError(f"data.instructions gives {len(recs)} records: too few to split train/eval")
        write_jsonl(ctx.out / "train.jsonl", train)
        write_jsonl(ctx.out / "eval.jsonl", evalr)
        text = read_text_source(d.text, recs)
        cut = int(len(text) * (1 - d.heldout_fraction))
        vcut = int(len(text) * (1 - d.heldout_fraction - d.val_fraction)) if d.val_fraction else cut
        atomic_write_text(ctx.out / "text_train.txt", text[:vcut])
        if d.val_fraction:  # between training and held-out text: neither trained on nor reported
            atomic_write_text(ctx.out / "text_val.txt", text[vcut:cut])
        atomic_write_text(ctx.out / "text_heldout.txt", text[cut:])
        ctx.log(f"data: {len(train)} train / {len(evalr)} eval records, text {vcut:,} + "
                f"{cut - vcut:,} validation + {len(text) - cut:,} held-out chars")
        return {"train_records": len(train), "eval_records": len(evalr), "text_chars": len(text)}

    return fn


def run_corpus(ctx: StageContext, dcfg: Any, tokenizer_ref: Any) -> Any:
    """MiniLLM's pretraining text of a training stage (``lm_data``: a path on the driver, any
    URI, or ``text``: the chain's own training text, the data stage's text_train.txt, never
    its held-out or validation parts) as a token corpus in the run directory's ``corpora/``,
    tokenised by Ray Data the first time and reused by every later stage, rerun and driver
    (cbd_ray.corpus): nothing is copied per stage and no worker reads the whole text. None
    when the objective reads no pretraining text."""
    from cbd_ray.train import lm_corpus

    own = ctx.uri("data", "text_train.txt") if dcfg.lm_data == "text" else None
    return lm_corpus(dcfg, own, tokenizer_ref, ctx.uri("corpora"), say=ctx.log)

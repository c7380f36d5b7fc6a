"""Instruction and text data: records → the paper's prompt template → token ids.

Records follow the Dolly schema: ``instruction``, ``context`` (optional, Dolly's "input"),
``response`` (optional for prompt-only data) and ``category`` (optional). They come from a
local JSONL / JSON / Parquet file or a Hub dataset name (``datasets.load_dataset``).

Every transform exists twice, sharing one implementation: a plain-Python function
(``encode_instruction``, ``encode_records``, ``pack_text``) used by the per-worker training
loop and by Ray-free tests, and a Ray Data pipeline (``tokenize_dataset``) that runs the same
function in ``map_batches`` with a callable class, so the tokenizer is loaded once per actor
of an ``ActorPoolStrategy`` pool.

Encoded rows hold ``input_ids`` (prompt + response + EOS), ``loss_mask`` (1 on response
tokens only: the loss never counts the prompt or padding), ``prompt_length`` and ``length``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from cbd_ray.errors import CBDError, IncompatibleModelsError

log = logging.getLogger(__name__)

# The paper's (Alpaca-style) template, as MiniLLM renders Dolly.
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

Overflow = Literal["truncate", "error"]
OVERFLOW = ("truncate", "error")
INSTRUCTION_SUFFIXES = (".jsonl", ".json", ".parquet")


def render_prompt(instruction: str, context: str = "") -> str:
    """The prompt of one record: the template with the input section only when ``context``
    is non-empty (after stripping whitespace)."""
    context = (context or "").strip()
    if context:
        return PROMPT_WITH_INPUT.format(instruction=instruction.strip(), input=context)
    return PROMPT_NO_INPUT.format(instruction=instruction.strip())


# ---------------------------------------------------------------------------------- records


def _normalise(rec: Any, where: str, require_response: bool) -> dict[str, str]:
    """One validated record; ``where`` ("file:line") names it in errors."""
    if not isinstance(rec, dict):
        raise CBDError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if "context" not in rec and "input" in rec:  # Alpaca / MiniLLM spelling
        rec = {**rec, "context": rec["input"]}
    if "response" not in rec and "output" in rec:
        rec = {**rec, "response": rec["output"]}
    required = ["instruction"] + (["response"] if require_response else [])
    for key in required:
        value = rec.get(key)
        if value is None:
            raise CBDError(f"{where}: record is missing field {key!r} (has {sorted(rec)}); "
                           f"each record needs instruction, context (optional), response, category (optional)")
        if not isinstance(value, str):
            raise CBDError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not rec["instruction"].strip():
        raise CBDError(f"{where}: field 'instruction' is empty")
    out = {"instruction": rec["instruction"], "context": str(rec.get("context") or "")}
    if rec.get("response") is not None:
        out["response"] = str(rec["response"])
    if rec.get("category") is not None:
        out["category"] = str(rec["category"])
    return out


def _utf8_error(path: Path, data: bytes, exc: UnicodeDecodeError, first_line: int = 1) -> CBDError:
    """file:line:column of the first byte that is not UTF-8."""
    line = first_line + data.count(b"\n", 0, exc.start)
    col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    return CBDError(f"{path}:{line}:{col}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                    "save the file as UTF-8")


def read_utf8(path: str | os.PathLike) -> str:
    """A whole text file, strictly UTF-8: a bad byte is a CBDError naming file:line:column
    (never silently replaced)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _utf8_error(path, data, exc) from None


def read_json_file(path: str | os.PathLike) -> Any:
    """One JSON document; invalid UTF-8 or JSON is a CBDError naming file:line."""
    path = Path(path)
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise CBDError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterable[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSONL file; invalid UTF-8 or
    JSON is a CBDError naming file:line."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _utf8_error(path, raw, exc, lineno) from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise CBDError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None


def read_instructions(path_or_hub_name: str | os.PathLike, limit: int | None = None,
                      require_response: bool = True, split: str = "train") -> list[dict[str, str]]:
    """Instruction records from a local ``.jsonl`` / ``.json`` / ``.parquet`` file or a Hub
    dataset name. A record missing a field is an error naming the file and line (JSONL) or
    row (Parquet, Hub). ``require_response=False`` accepts prompt-only data."""
    if limit is not None and limit < 1:
        raise CBDError(f"limit must be >= 1 or None, got {limit}")
    spec = str(path_or_hub_name)
    path = Path(spec)
    records: list[dict[str, str]] = []
    if path.suffix in INSTRUCTION_SUFFIXES or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"instruction data {spec!r} not found")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
                raise CBDError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
            for i, rec in enumerate(table.to_pylist()):
                records.append(_normalise(rec, f"{path}: row {i}", require_response))
                if limit and len(records) >= limit:
                    break
        elif path.suffix == ".json":
            rows = read_json_file(path)
            if not isinstance(rows, list):
                raise CBDError(f"{path}: a .json file must hold a list of records")
            for i, rec in enumerate(rows[:limit] if limit else rows):
                records.append(_normalise(rec, f"{path}: record {i}", require_response))
        else:
            for lineno, rec in iter_jsonl(path):
                records.append(_normalise(rec, f"{path}:{lineno}", require_response))
                if limit and len(records) >= limit:
                    break
    elif "/" in spec and not spec.startswith((".", "/")):
        import datasets  # only for Hub names: local files never need it

        ds = datasets.load_dataset(spec, split=split)
        for i, rec in enumerate(ds):
            records.append(_normalise(dict(rec), f"{spec}[{split}] row {i}", require_response))
            if limit and len(records) >= limit:
                break
    else:
        raise FileNotFoundError(f"instruction data {spec!r} is neither an existing file "
                                f"({', '.join(INSTRUCTION_SUFFIXES)}) nor a Hub dataset name (owner/name)")
    if not records:
        raise CBDError(f"instruction data {spec!r} holds no records")
    return records


def instruction_dataset(path_or_hub_name: str | os.PathLike, limit: int | None = None,
                        require_response: bool = True):
    """The records of :func:`read_instructions` as a ``ray.data.Dataset`` (validated on the
    driver first, so a bad line fails before any actor starts)."""
    import ray.data

    return ray.data.from_items(read_instructions(path_or_hub_name, limit, require_response))


# ---------------------------------------------------------------------------------- encoding


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CBDError("the tokenizer has no EOS token: responses could not be terminated")
    return int(eos)


def pad_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else its EOS."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer))


def encode_instruction(tokenizer: Any, record: dict[str, str], max_len: int,
                       on_overflow: Overflow = "truncate", with_response: bool = True,
                       max_prompt_len: int | None = None) -> dict[str, Any] | None:
    """One record → ``{"input_ids": list[int], "loss_mask": list[int], "prompt_length": int,
    "length": int, "truncated": bool}``, or None when ``max_prompt_len`` is given and the
    prompt (template included) is longer: such a record is dropped, not cut (LMOps
    ``--max-prompt-length``; cutting from the left would lose the template's header).

    ``input_ids`` = prompt tokens + response tokens + EOS; ``loss_mask`` is 1 exactly on the
    response tokens and the EOS (the tokens the student is trained to produce). Longer than
    ``max_len``: the response is cut at the end; a prompt that alone leaves fewer than a
    quarter of ``max_len`` for the response keeps only its last tokens (the "### Response:"
    marker must stay); a prompt-only row (``with_response=False``) is cut the same way so
    sampled responses have room. ``on_overflow="error"`` refuses instead.
    """
    if on_overflow not in OVERFLOW:
        raise CBDError(f"on_overflow {on_overflow!r} is not one of {', '.join(OVERFLOW)}")
    prompt = tokenizer(render_prompt(record["instruction"], record.get("context", "")),
                       add_special_tokens=False)["input_ids"]
    if max_prompt_len is not None and len(prompt) > max_prompt_len:
        return None
    response: list[int] = []
    if with_response:
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [_eos_id(tokenizer)]
    total = len(prompt) + len(response)
    # prompt-only rows keep a quarter of max_len free for the responses sampled later
    truncated = total > max_len if with_response else len(prompt) > max_len - max(1, max_len // 4)
    if truncated:
        if on_overflow == "error":
            raise CBDError(f"a record of {total} tokens (prompt {len(prompt)}) exceeds max_len={max_len}: "
                           f"instruction {record['instruction'][:60]!r}; raise max_len or use on_overflow='truncate'")
        keep_prompt = max_len - max(1, max_len // 4)
        if len(prompt) > keep_prompt:
            prompt = prompt[-keep_prompt:]
        response = response[: max_len - len(prompt)]
    ids = prompt + response
    return {
        "input_ids": ids,
        "loss_mask": [0] * len(prompt) + [1] * len(response),
        "prompt_length": len(prompt),
        "length": len(ids),
        "truncated": truncated,
    }


def encode_records(tokenizer: Any, records: Sequence[dict[str, str]], max_len: int,
                   on_overflow: Overflow = "truncate", with_response: bool = True,
                   max_prompt_len: int | None = None) -> list[dict[str, Any]]:
    """Plain-Python tokenisation of many records (see :func:`encode_instruction`): the rows
    of the records kept (those whose prompt is over ``max_prompt_len`` are dropped); logs how
    many were truncated and dropped."""
    encoded = [encode_instruction(tokenizer, r, max_len, on_overflow, with_response, max_prompt_len)
               for r in records]
    rows = [r for r in encoded if r is not None]
    if len(rows) < len(encoded):
        log.warning("dropped %d of %d records whose prompt is over max_prompt_len=%s tokens",
                    len(encoded) - len(rows), len(encoded), max_prompt_len)
    n = sum(r["truncated"] for r in rows)
    if n:
        log.warning("truncated %d of %d records to max_len=%d tokens", n, len(rows), max_len)
    return rows


def truncated_count(rows: Iterable[dict[str, Any]]) -> int:
    """How many encoded rows were truncated."""
    return sum(bool(r["truncated"]) for r in rows)


class TokenizeBatch:
    """``map_batches`` callable: loads the tokenizer once per actor, then encodes batches.

    A batch is ``{"instruction": array[str], "context": array[str], "response": array[str]}``
    (response absent for prompt-only data); the output has ``input_ids`` and ``loss_mask``
    (``[n, max_len]``, right-padded with ``pad`` / 0), ``prompt_length``, ``length`` and
    ``truncated`` and ``dropped`` (``[n]``). A record whose prompt is over ``max_prompt_len``
    comes back as an empty row (length 0) marked ``dropped`` 1, for the driver to leave out
    and count (:func:`kept_rows`): an actor never returns a smaller batch, since Ray Data
    stores a 0-row tensor column as another type than the other blocks'."""

    def __init__(self, tokenizer_dir: Any, max_len: int, on_overflow: Overflow = "truncate",
                 with_response: bool = True, max_prompt_len: int | None = None, report: bool = True) -> None:
        from transformers import AutoTokenizer

        from cbd_ray.storage import materialize

        # a path, or a storage reference fetched into this node's cache (never a driver path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(materialize(tokenizer_dir)))
        self.max_len, self.on_overflow, self.with_response = max_len, on_overflow, with_response
        self.max_prompt_len = max_prompt_len
        self.pad = pad_id(self.tokenizer)
        self.truncated = self.dropped = 0
        self.report = report  # log each batch's counts (an actor's only voice); off in the driver

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        n = len(batch["instruction"])
        rows = [
            encode_instruction(
                self.tokenizer,
                {"instruction": str(batch["instruction"][i]),
                 "context": str(batch["context"][i]) if "context" in batch else "",
                 "response": str(batch["response"][i]) if "response" in batch else ""},
                self.max_len, self.on_overflow, self.with_response, self.max_prompt_len)
            for i in range(n)
        ]
        dropped = np.array([r is None for r in rows], dtype=np.int8)
        if dropped.any():
            self.dropped += int(dropped.sum())
            if self.report:
                log.warning("dropping %d of %d records whose prompt is over max_prompt_len=%s (actor total %d)",
                            int(dropped.sum()), n, self.max_prompt_len, self.dropped)
        empty = {"input_ids": [], "loss_mask": [], "prompt_length": 0, "length": 0, "truncated": False}
        rows = [r if r is not None else empty for r in rows]
        ids = np.full((n, self.max_len), self.pad, dtype=np.int32)
        mask = np.zeros((n, self.max_len), dtype=np.int8)
        for i, r in enumerate(rows):
            ids[i, : r["length"]] = r["input_ids"]
            mask[i, : r["length"]] = r["loss_mask"]
        cut = sum(r["truncated"] for r in rows)
        if cut:
            self.truncated += cut
        if cut and self.report:
            log.warning("truncated %d of %d records to max_len=%d (actor total %d)", cut, n, self.max_len, self.truncated)
        return {
            "input_ids": ids,
            "loss_mask": mask,
            "prompt_length": np.array([r["prompt_length"] for r in rows], dtype=np.int32),
            "length": np.array([r["length"] for r in rows], dtype=np.int32),
            "truncated": np.array([r["truncated"] for r in rows], dtype=np.int8),
            "dropped": dropped,
            **({"idx": np.asarray(batch["idx"])} if "idx" in batch else {}),  # keeps the record order
        }


def kept_rows(table: Any) -> tuple[Any, int]:
    """(the rows of a :class:`TokenizeBatch` output table that were not dropped, without the
    ``dropped`` column; how many were dropped)."""
    import numpy as np

    if "dropped" not in table.column_names:
        return table, 0
    flags = table["dropped"].to_numpy()
    n = int(flags.sum())
    if n:
        table = table.take(np.flatnonzero(flags == 0))
    return table.drop_columns(["dropped"]), n


def tokenize_in_process(items: Sequence[dict[str, Any]], tokenizer_dir: Any, max_len: int, batch_size: int = 256,
                        on_overflow: Overflow = "truncate", with_response: bool = True,
                        max_prompt_len: int | None = None) -> Any:
    """:class:`TokenizeBatch` in this process over ``items`` (records, each with its ``idx``):
    the Arrow table, column for column and type for type, that :func:`tokenize_dataset`'s
    actors give once materialised. For data so small that starting an actor pool (a process
    that imports transformers) costs more than the work."""
    import numpy as np
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    tok = TokenizeBatch(tokenizer_dir, max_len, on_overflow, with_response, max_prompt_len, report=False)
    keys = [k for k in ("instruction", "context", "response", "idx") if any(k in r for r in items)]
    parts = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = {k: np.array([r.get(k, "") for r in chunk], dtype=np.int64 if k == "idx" else object) for k in keys}
        out = tok(batch)
        parts.append(pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v)
                               for k, v in out.items()}))
    return pa.concat_tables(parts)


def tokenize_dataset(ds: Any, tokenizer_dir: Any, max_len: int, actors: int = 1,
                     batch_size: int = 64, on_overflow: Overflow = "truncate", with_response: bool = True,
                     max_prompt_len: int | None = None) -> Any:
    """Tokenise a Ray Dataset of records with a pool of ``actors`` :class:`TokenizeBatch`
    actors (each loads the tokenizer once); records whose prompt is over ``max_prompt_len``
    are dropped."""
    import ray.data

    from cbd_ray.console import quiet_ray_data

    quiet_ray_data()  # Ray Data's progress lines off a quiet console
    if actors < 1:
        raise CBDError(f"actors must be >= 1, got {actors}")
    return ds.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={"tokenizer_dir": tokenizer_dir if isinstance(tokenizer_dir, dict) else str(tokenizer_dir),
                               "max_len": max_len,
                               "on_overflow": on_overflow, "with_response": with_response,
                               "max_prompt_len": max_prompt_len},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=0.5,  # tokenising is light: leave CPUs for training workers
    )


def rows_from_arrays(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Fixed-width rows (as :class:`TokenizeBatch` writes them) → variable-length rows."""
    out = []
    for i in range(len(batch["length"])):
        n = int(batch["length"][i])
        out.append({
            "input_ids": [int(x) for x in batch["input_ids"][i][:n]],
            "loss_mask": [int(x) for x in batch["loss_mask"][i][:n]],
            "prompt_length": int(batch["prompt_length"][i]),
            "length": n,
            "truncated": bool(batch["truncated"][i]),
        })
    return out


def collate(rows: Sequence[dict[str, Any]], pad: int) -> dict[str, Any]:
    """Right-pad encoded rows to the longest: ``input_ids``, ``attention_mask``, ``loss_mask``
    ``[B, T]`` (LongTensor) and ``prompt_length`` ``[B]``."""
    import torch

    if not rows:
        raise CBDError("cannot collate an empty batch")
    t = max(int(r["length"]) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), t), dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        n = int(r["length"])
        ids[i, :n] = torch.tensor(r["input_ids"][:n], dtype=torch.long)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(r["loss_mask"][:n], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask,
            "prompt_length": torch.tensor([int(r["prompt_length"]) for r in rows], dtype=torch.long)}


def left_padded_prompts(batch: dict[str, Any], pad: int) -> tuple[Any, Any]:
    """The prompts of a collated batch, left-padded for sampling: ``(ids, attention_mask)``
    both ``[B, P]`` with P the longest prompt."""
    import torch

    lens = batch["prompt_length"].tolist()
    p = max(lens)
    ids = torch.full((len(lens), p), pad, dtype=torch.long, device=batch["input_ids"].device)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        ids[i, p - n:] = batch["input_ids"][i, :n]
        attn[i, p - n:] = 1
    return ids, attn


# ---------------------------------------------------------------------------------- plain text


def pack_text(tokenizer: Any, texts: Iterable[str], block_size: int) -> Any:
    """Concatenate documents (each followed by EOS) and cut into full blocks:
    LongTensor ``[n_blocks, block_size]`` for language-modelling losses (the tail that does
    not fill a block is dropped)."""
    import torch

    if block_size < 2:
        raise CBDError(f"block_size must be >= 2, got {block_size}")
    eos = _eos_id(tokenizer)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    n = len(ids) // block_size
    if n == 0:
        raise CBDError(f"text of {len(ids)} tokens is shorter than one block of {block_size}")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def read_text(path: str | os.PathLike) -> list[str]:
    """Plain-text documents for the language-modelling loss: a ``.txt`` file (one document),
    or JSONL with a ``text`` field per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text data {str(path)!r} not found")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, rec in iter_jsonl(path):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CBDError(f"{path}:{lineno}: record needs a string field 'text'")
            docs.append(rec["text"])
        return docs
    return [read_utf8(path)]


# ---------------------------------------------------------------------------------- vocabularies


def _vocab_size(obj: Any) -> int:
    """The embedding rows of a config / model, or the length of a tokenizer."""
    if hasattr(obj, "convert_tokens_to_ids"):  # a tokenizer
        return len(obj)
    cfg = getattr(obj, "config", obj)
    size = getattr(cfg, "vocab_size", None)
    if size is None and hasattr(cfg, "get_text_config"):
        size = getattr(cfg.get_text_config(), "vocab_size", None)
    if size is None:
        raise CBDError(f"cannot tell the vocabulary size of {type(obj).__name__}")
    return int(size)


def same_tokenizer(a: Any, b: Any) -> bool:
    """True when two tokenizers map the same strings to the same ids."""
    if a is b:
        return True
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def check_vocab(teacher: Any, student: Any, teacher_tokenizer: Any = None, student_tokenizer: Any = None) -> int:
    """The vocabulary teacher and student share: the smaller of their embedding sizes.

    ``teacher`` / ``student``: Hugging Face configs or models. Sizes that differ only by
    padding (one tokenizer, embedding rows rounded up, e.g. 151936 vs 152064) are fine: the
    logits are sliced to the shared size, which must still hold every tokenizer id. Different
    tokenizers raise :class:`IncompatibleModelsError` pointing to SeqKD / the bridge.
    """
    t_size, s_size = _vocab_size(teacher), _vocab_size(student)
    if teacher_tokenizer is not None and student_tokenizer is not None:
        if not same_tokenizer(teacher_tokenizer, student_tokenizer):
            raise IncompatibleModelsError(
                f"teacher and student use different tokenizers ({len(teacher_tokenizer)} vs "
                f"{len(student_tokenizer)} tokens): token-level distillation needs one vocabulary. "
                "Use objective 'seqkd' on teacher-generated answers, or a bridge model of the "
                "student's family (the chain's bridge stage)")
    shared = min(t_size, s_size)
    tok = student_tokenizer if student_tokenizer is not None else teacher_tokenizer
    needed = len(tok) if tok is not None else max(t_size, s_size)
    if shared < needed:
        raise IncompatibleModelsError(
            f"teacher vocabulary {t_size} and student vocabulary {s_size} differ by more than padding "
            f"(the tokenizer has {needed} tokens): use objective 'seqkd' or a bridge model of the "
            "student's family")
    if t_size != s_size:
        log.info("vocabularies %d (teacher) and %d (student) differ by padding: using the shared %d",
                 t_size, s_size, shared)
    return shared

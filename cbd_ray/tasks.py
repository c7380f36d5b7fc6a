"""Evaluation tasks: dataset readers and the lm-evaluation-harness prompt formats.

Two layers, kept apart so each can be tested alone:

* **Readers** turn the files of a data folder laid out like ``../shared/data`` (each
  folder's SOURCE.md gives the schema) into plain records, or load the same data from the
  Hugging Face Hub by name when online. A record missing a field is reported with its file
  and line; nothing is guessed.
* **Tasks** turn records into scoring requests the way lm-evaluation-harness builds them:
  multiple choice as ``(context, continuation)`` pairs whose summed log-likelihood is
  compared, generation as prompts with references, perplexity as held-out text.

``TASKS`` is the registry: ``boolq, winogrande, hellaswag, arc_easy, mmlu, dolly,
wikitext2, tinyshakespeare``. A task may name another file as ``NAME:PATH`` (e.g.
``dolly:/data/my_eval.jsonl``: any JSONL of the Dolly schema). In a data folder that is not
laid out like ``../shared/data``, each task's file is found by glob (``boolq*/*dev*.jsonl``,
``*boolq*.jsonl``, ...: :func:`find_task_data`); several candidates are an error that asks
for ``NAME:PATH``.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from cbd_ray.data import render_prompt
from cbd_ray.errors import CBDError

TaskKind = Literal["multiple_choice", "generation", "perplexity"]


class DataError(CBDError):
    """A data file is missing, malformed, or a record lacks a field (message: file and line)."""


class UnknownTaskError(CBDError):
    """A task name that is not in ``TASKS``."""


# --------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One log-likelihood request: score ``continuation`` given ``context``."""

    context: str
    continuation: str


@dataclass(frozen=True)
class MCExample:
    """A multiple-choice question as lm-evaluation-harness scores it.

    ``requests[i]`` is choice i; ``gold`` indexes the right one; ``norm_chars[i]`` is the
    character length of choice i's text (without the delimiter), the divisor of acc_norm as
    lm-eval computes it; ``norm_bytes[i]`` its UTF-8 byte length, the divisor of acc_bytes.
    """

    requests: tuple[Request, ...]
    gold: int
    norm_bytes: tuple[int, ...]
    norm_chars: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class GenExample:
    """A generation request: greedy answer to ``prompt`` compared with ``reference``."""

    prompt: str
    reference: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def mc_example(context: str, choices: list[str], gold: int, delimiter: str = " ",
               where: str = "", meta: dict[str, Any] | None = None) -> MCExample:
    """Same context for every choice; continuation = ``delimiter + choice``."""
    if not choices:
        raise DataError(f"{where or 'example'}: the choice list is empty (a question needs at least one choice)")
    if not 0 <= gold < len(choices):
        raise DataError(f"{where or 'example'}: gold index {gold} is outside 0..{len(choices) - 1}")
    return MCExample(
        requests=tuple(Request(context, delimiter + c) for c in choices),
        gold=gold,
        norm_bytes=tuple(len(c.encode("utf-8")) for c in choices),
        norm_chars=tuple(len(c) for c in choices),
        meta=meta or {},
    )


# --------------------------------------------------------------------------------------
# Readers (file formats of ../shared/data)
# --------------------------------------------------------------------------------------


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def read_jsonl(path: str | os.PathLike, required: dict[str, type | tuple[type, ...]],
               limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a JSONL file; each must have ``required`` fields of the given types.

    Each record gains ``_where`` ("file:line") so later errors can name it too. Raises
    ``DataError`` naming the file and the (1-based) line of the first bad record.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{_where(path, lineno)}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{_where(path, lineno)}: a record must be a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise DataError(f"{_where(path, lineno)}: record is missing field(s) {', '.join(missing)} "
                                f"(required: {', '.join(required)})")
            for k, typ in required.items():
                if not isinstance(rec[k], typ):
                    names = "/".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
                    raise DataError(f"{_where(path, lineno)}: field {k!r} must be {names}, "
                                    f"got {type(rec[k]).__name__}")
            rec["_where"] = _where(path, lineno)
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    return out


def read_boolq(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """BoolQ JSONL: question (lower case, no '?'), passage, answer (bool)."""
    return read_jsonl(path, {"question": str, "passage": str, "answer": bool}, limit)


def read_winogrande(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """WinoGrande 1.1 JSONL: sentence with one "_", option1, option2, answer "1"/"2"."""
    recs = read_jsonl(path, {"sentence": str, "option1": str, "option2": str, "answer": (str, int)}, limit)
    for r in recs:
        if "_" not in r["sentence"]:
            raise DataError(f"{r['_where']}: sentence has no '_' blank")
        if str(r["answer"]) not in ("1", "2"):
            raise DataError(f"{r['_where']}: answer must be '1' or '2', got {r['answer']!r}")
    return recs


def read_hellaswag(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """HellaSwag JSONL (preprocessed text): activity_label, ctx, endings, label."""
    recs = read_jsonl(path, {"activity_label": str, "ctx": str, "endings": list, "label": (int, str)}, limit)
    for r in recs:
        r["label"] = int(r["label"])
    return recs


def read_arc(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """ARC in the MosaicML gauntlet format: query ("Question: ..."), choices, gold (0-based)."""
    return read_jsonl(path, {"query": str, "choices": list, "gold": int}, limit)


def read_dolly(path: str | os.PathLike, limit: int | None = None,
               with_response: bool = True) -> list[dict[str, Any]]:
    """Dolly-schema JSONL: instruction, context (may be empty), response (unless prompts-only)."""
    req: dict[str, Any] = {"instruction": str, "context": str}
    if with_response:
        req["response"] = str
    return read_jsonl(path, req, limit)


MMLU_LETTERS = ("A", "B", "C", "D")


def read_mmlu_csv(path: str | os.PathLike, subject: str | None = None) -> list[dict[str, Any]]:
    """One MMLU CSV (no header): question, A, B, C, D, answer letter."""
    path = Path(path)
    if subject is None:
        subject = re.sub(r"_(test|val|dev)$", "", path.stem)
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            where = _where(path, reader.line_num)
            if not row:
                continue
            if len(row) != 6:
                raise DataError(f"{where}: expected 6 fields (question, A, B, C, D, answer), got {len(row)}")
            if row[5].strip() not in MMLU_LETTERS:
                raise DataError(f"{where}: answer must be one of A, B, C, D, got {row[5]!r}")
            out.append({"subject": subject, "question": row[0], "choices": row[1:5],
                        "answer": MMLU_LETTERS.index(row[5].strip()), "_where": where})
    return out


def read_mmlu(folder: str | os.PathLike, split: str = "test",
              subjects: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """MMLU ``{folder}/{split}/<subject>_{split}.csv`` -> {subject: records}, subjects sorted."""
    d = Path(folder) / split
    if not d.is_dir():
        raise DataError(f"MMLU split folder {d} does not exist (expected {folder}/{{test,val,dev}}/*.csv)")
    files = sorted(d.glob(f"*_{split}.csv"))
    if not files:
        raise DataError(f"{d} holds no *_{split}.csv files")
    found = {re.sub(rf"_{split}$", "", p.stem): p for p in files}
    if subjects:
        unknown = [s for s in subjects if s not in found]
        if unknown:
            raise DataError(f"unknown MMLU subject(s) {', '.join(unknown)}; known: {', '.join(found)}")
        found = {s: found[s] for s in subjects}
    return {s: read_mmlu_csv(p, s) for s, p in found.items()}


def read_text(path: str | os.PathLike) -> str:
    """A plain text file, byte-exact (no newline translation)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def tinyshakespeare_split(text: str, split: str) -> str:
    """The usual split of TinyShakespeare: first 90% of characters train, last 10% val."""
    cut = int(len(text) * 0.9)
    return {"train": text[:cut], "val": text[cut:], "all": text}[split]


# Every file of a data folder laid out like ../shared/data: (dataset, split) -> (path, reader).
def _jsonl(reader: Callable[..., list[dict[str, Any]]], **kw: Any) -> Callable[[Path], Any]:
    return lambda p: reader(p, **kw)


DATASETS: dict[tuple[str, str], tuple[str, Callable[[Path], Any]]] = {
    ("boolq", "dev"): ("boolq/boolq_dev.jsonl", _jsonl(read_boolq)),
    ("winogrande", "dev"): ("winogrande/winogrande_dev.jsonl", _jsonl(read_winogrande)),
    ("winogrande", "train_xs"): ("winogrande/winogrande_train_xs.jsonl", _jsonl(read_winogrande)),
    ("hellaswag", "val"): ("hellaswag/hellaswag_val.jsonl", _jsonl(read_hellaswag)),
    ("arc_easy", "test"): ("arc_easy/arc_easy_test.jsonl", _jsonl(read_arc)),
    ("mmlu", "test"): ("mmlu", lambda p: read_mmlu(p, "test")),
    ("mmlu", "val"): ("mmlu", lambda p: read_mmlu(p, "val")),
    ("mmlu", "dev"): ("mmlu", lambda p: read_mmlu(p, "dev")),
    ("dolly", "eval"): ("dolly/dolly_eval.jsonl", _jsonl(read_dolly)),
    ("dolly", "train"): ("dolly/dolly_train_1k.jsonl", _jsonl(read_dolly)),
    ("dolly", "prompts"): ("dolly/dolly_prompts_only.jsonl", _jsonl(read_dolly, with_response=False)),
    ("wikitext2", "test"): ("wikitext2/wiki.test.raw", read_text),
    ("wikitext2", "valid"): ("wikitext2/wiki.valid.raw", read_text),
    ("wikitext2", "test_tokens"): ("wikitext2/wiki.test.tokens", read_text),
    ("wikitext2", "valid_tokens"): ("wikitext2/wiki.valid.tokens", read_text),
    ("tinyshakespeare", "train"): ("tinyshakespeare/input.txt", lambda p: tinyshakespeare_split(read_text(p), "train")),
    ("tinyshakespeare", "val"): ("tinyshakespeare/input.txt", lambda p: tinyshakespeare_split(read_text(p), "val")),
}


def read_dataset(data_dir: str | os.PathLike, name: str, split: str) -> Any:
    """Read one (dataset, split) of a folder laid out like ../shared/data."""
    key = (name, split)
    if key not in DATASETS:
        known = ", ".join(f"{n}/{s}" for n, s in DATASETS)
        raise DataError(f"unknown dataset split {name}/{split}; known: {known}")
    rel, reader = DATASETS[key]
    return reader(Path(data_dir) / rel)


# --------------------------------------------------------------------------------------
# Hugging Face Hub (when online): records normalised to the local schemas above
# --------------------------------------------------------------------------------------

HUB: dict[str, tuple[tuple[str, ...], str]] = {
    # task -> ((load_dataset args), split)
    "boolq": (("google/boolq",), "validation"),
    "winogrande": (("allenai/winogrande", "winogrande_xl"), "validation"),
    "hellaswag": (("Rowan/hellaswag",), "validation"),
    "arc_easy": (("allenai/ai2_arc", "ARC-Easy"), "test"),
    "mmlu": (("cais/mmlu", "all"), "test"),
    "dolly": (("databricks/databricks-dolly-15k",), "train"),
    "wikitext2": (("Salesforce/wikitext", "wikitext-2-raw-v1"), "test"),
    "tinyshakespeare": (("karpathy/tiny_shakespeare",), "test"),
}


def load_hub(task: str, split: str | None = None) -> Any:
    """Load a task's data from the Hub and convert it to the local record schema."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover
        raise DataError("loading from the Hub needs the `datasets` package") from exc
    args, default_split = HUB[task]
    split = split or default_split
    try:
        ds = datasets.load_dataset(*args, split=split)
    except Exception as exc:  # noqa: BLE001  (offline, unknown name, ...: one clear message)
        raise DataError(f"could not load {task} from the Hub ({'/'.join(args)}, split {split}): {exc}; "
                        f"offline machines pass --data-dir pointing at a folder laid out like shared/data") from exc
    rows = [dict(r, _where=f"hub:{args[0]}[{i}]") for i, r in enumerate(ds)]
    if task == "hellaswag":  # lm-eval: ctx = ctx_a + " " + ctx_b.capitalize()
        return [{"activity_label": r["activity_label"], "ctx": r["ctx_a"] + " " + r["ctx_b"].capitalize(),
                 "endings": r["endings"], "label": int(r["label"]), "_where": r["_where"]} for r in rows]
    if task == "arc_easy":
        return [{"query": "Question: " + r["question"], "choices": r["choices"]["text"],
                 "gold": r["choices"]["label"].index(r["answerKey"]), "_where": r["_where"]} for r in rows]
    if task == "mmlu":
        by: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by.setdefault(r["subject"], []).append({"subject": r["subject"], "question": r["question"],
                                                    "choices": r["choices"], "answer": int(r["answer"]),
                                                    "_where": r["_where"]})
        return dict(sorted(by.items()))
    if task in ("wikitext2", "tinyshakespeare"):
        return "".join(r["text"] for r in rows) if task == "wikitext2" else "\n".join(r["text"] for r in rows)
    return rows


# --------------------------------------------------------------------------------------
# Prompt formats (lm-evaluation-harness)
# --------------------------------------------------------------------------------------


def boolq_example(doc: dict[str, Any]) -> MCExample:
    """lm-eval boolq: "{passage}\\nQuestion: {question}?\\nAnswer:" then " no" / " yes"."""
    ctx = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    return mc_example(ctx, ["no", "yes"], int(bool(doc["answer"])), where=doc.get("_where", ""))


def winogrande_example(doc: dict[str, Any]) -> MCExample:
    """lm-eval winogrande, partial scoring: the context is the sentence up to the blank
    with each option substituted; the continuation is the rest of the sentence after the
    blank, the same for both options, so only how well each option predicts it counts."""
    sentence = doc["sentence"]
    idx = sentence.index("_")
    continuation = " " + sentence[idx + 1:].strip()
    options = [doc["option1"], doc["option2"]]
    contexts = [sentence[:idx] + opt for opt in options]
    return MCExample(
        requests=tuple(Request(c, continuation) for c in contexts),
        gold=int(str(doc["answer"])) - 1,
        norm_bytes=tuple(len(continuation.strip().encode("utf-8")) for _ in contexts),
        norm_chars=tuple(len(continuation.strip()) for _ in contexts),
        meta={"where": doc.get("_where", "")},
    )


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning (idempotent on the already-cleaned local copy)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(doc: dict[str, Any]) -> MCExample:
    """lm-eval hellaswag: query = preprocess(activity_label + ": " + ctx), endings preprocessed.

    The local copy is already cleaned and its ctx is ctx_a + " " + ctx_b with ctx_b not
    capitalised (the split point is lost, see SOURCE.md); Hub records are capitalised on load."""
    ctx = hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx"])
    return mc_example(ctx, [hellaswag_preprocess(e) for e in doc["endings"]], doc["label"],
                      where=doc.get("_where", ""))


def arc_example(doc: dict[str, Any]) -> MCExample:
    """lm-eval arc_easy: "Question: {q}\\nAnswer:" then " {choice}" (the local query already
    starts with "Question: ")."""
    q = doc["query"]
    if not q.startswith("Question: "):
        q = "Question: " + q
    return mc_example(q + "\nAnswer:", list(doc["choices"]), doc["gold"], where=doc.get("_where", ""))


def mmlu_question_text(doc: dict[str, Any]) -> str:
    """lm-eval mmlu doc_to_text: question, lettered choices, "Answer:"."""
    lines = [doc["question"].strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, doc["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_prompt(doc: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """lm-eval mmlu: description line, k solved dev examples, then the question.

    "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
    + "\\n\\n".join(shot + " " + letter) + "\\n\\n" + question."""
    subject = doc["subject"].replace("_", " ")
    parts = [mmlu_question_text(s) + " " + MMLU_LETTERS[s["answer"]] for s in shots]
    parts.append(mmlu_question_text(doc))
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n" + "\n\n".join(parts)


def mmlu_example(doc: dict[str, Any], shots: list[dict[str, Any]]) -> MCExample:
    """An MMLU question after ``shots`` solved examples; continuations " A" .. " D"."""
    if not doc["choices"]:
        raise DataError(f"{doc.get('_where', 'MMLU question')}: the choice list is empty")
    letters = list(MMLU_LETTERS[: len(doc["choices"])])
    return mc_example(mmlu_prompt(doc, shots), letters, doc["answer"], where=doc.get("_where", ""),
                      meta={"subject": doc["subject"]})


# The instruction template is shared with training (cbd_ray.data) so prompts match exactly.


def dolly_example(doc: dict[str, Any]) -> GenExample:
    """A Dolly-schema record as a prompt in the paper's template and its reference answer."""
    return GenExample(prompt=render_prompt(doc["instruction"], doc.get("context", "") or ""),
                      reference=doc["response"], meta={"category": doc.get("category", "")})


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One evaluation task: how to find its data and turn it into requests."""

    name: str
    kind: TaskKind
    path: str  # default file (or folder) relative to the data dir
    metrics: tuple[str, ...]  # reported (multiple choice: also each one's _stderr)
    description: str
    globs: tuple[str, ...] = ()  # where else in a data dir the file may be, most specific first


_MC3 = ("acc", "acc_norm", "acc_bytes")
TASKS: dict[str, Task] = {
    "boolq": Task("boolq", "multiple_choice", "boolq/boolq_dev.jsonl", _MC3,
                  "BoolQ dev: yes/no reading comprehension",
                  ("boolq*/*dev*.jsonl", "boolq*/*val*.jsonl", "*boolq*dev*.jsonl", "*boolq*val*.jsonl",
                   "boolq*/*.jsonl", "*boolq*.jsonl")),
    "winogrande": Task("winogrande", "multiple_choice", "winogrande/winogrande_dev.jsonl", ("acc",),
                       "WinoGrande dev, partial scoring of the text after the blank",
                       ("winogrande*/*dev*.jsonl", "winogrande*/*val*.jsonl", "*winogrande*dev*.jsonl",
                        "*winogrande*val*.jsonl")),
    "hellaswag": Task("hellaswag", "multiple_choice", "hellaswag/hellaswag_val.jsonl", _MC3,
                      "HellaSwag val: sentence completion",
                      ("hellaswag*/*val*.jsonl", "*hellaswag*val*.jsonl", "hellaswag*/*.jsonl", "*hellaswag*.jsonl")),
    "arc_easy": Task("arc_easy", "multiple_choice", "arc_easy/arc_easy_test.jsonl", _MC3,
                     "ARC-Easy test: grade-school science",
                     ("arc*easy*/*test*.jsonl", "*arc*easy*test*.jsonl", "arc*easy*/*.jsonl", "*arc*easy*.jsonl")),
    "mmlu": Task("mmlu", "multiple_choice", "mmlu", ("acc", "acc_subject_macro"),
                 "MMLU test, 57 subjects, k-shot from dev", ("mmlu*",)),
    "dolly": Task("dolly", "generation", "dolly/dolly_eval.jsonl", ("rougeL",),
                  "Dolly eval: Rouge-L of greedy answers", ("dolly*/*eval*.jsonl", "*dolly*eval*.jsonl")),
    "wikitext2": Task("wikitext2", "perplexity", "wikitext2/wiki.test.raw", ("ppl", "nll"),
                      "WikiText-2 raw test: token perplexity",
                      ("wikitext*2*/*test*.raw", "wikitext*2*/*test*.txt", "*wikitext*2*test*")),
    "tinyshakespeare": Task("tinyshakespeare", "perplexity", "tinyshakespeare/input.txt", ("ppl", "nll"),
                            "TinyShakespeare last 10%: token perplexity",
                            ("tinyshakespeare*/*.txt", "*shakespeare*.txt")),
}


def parse_task(spec: str) -> tuple[Task, str | None]:
    """``"name"`` or ``"name:PATH"`` -> (task, explicit path or None)."""
    name, _, path = spec.strip().partition(":")
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name], (path or None)


def parse_tasks(specs: str | list[str]) -> list[tuple[Task, str | None]]:
    """A comma-separated string or a list of task specs, all checked before any work."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    if not specs:
        raise UnknownTaskError(f"no task given; known tasks: {', '.join(TASKS)}")
    return [parse_task(s) for s in specs]


def default_data_dir() -> Path | None:
    """``$CBD_DATA_DIR`` when set (a folder laid out like shared/data), else None (Hub)."""
    env = os.environ.get("CBD_DATA_DIR")
    return Path(env) if env else None


def find_task_data(task: Task, data_dir: str | os.PathLike) -> Path:
    """The task's file (MMLU: folder) in ``data_dir``: the shared/data name when present,
    else the one match of the first of ``task.globs`` that matches anything. Several matches
    are an error naming them (pick one with ``NAME:PATH``); none names what was looked for."""
    root = Path(data_dir)
    exact = root / task.path
    if exact.exists():
        return exact
    for pattern in task.globs:
        found = sorted(p for p in root.glob(pattern) if p.is_dir() == (task.name == "mmlu"))
        if len(found) == 1:
            return found[0]
        if found:
            raise DataError(f"task {task.name}: {len(found)} files in {root} match {pattern!r} "
                            f"({', '.join(p.name for p in found[:5])}); name one as {task.name}:PATH")
    raise DataError(f"data for task {task.name} not found in {root}: no {task.path} and nothing matching "
                    f"{', '.join(task.globs) or '-'} (or give the file as {task.name}:PATH)")


def load_examples(task: Task, data_dir: str | os.PathLike | None = None, path: str | None = None,
                  limit: int | None = None, shots: int = 0) -> list[MCExample] | list[GenExample] | str:
    """The task's examples (or, for perplexity, its held-out text).

    ``path`` (a file) overrides the task's default file; ``data_dir`` None means the Hub.
    ``limit`` keeps the first N examples (MMLU: the first N of every subject, as lm-eval).
    """
    if limit is not None and limit < 1:
        raise CBDError(f"limit must be a positive number of examples, got {limit}")
    if shots < 0:
        raise CBDError(f"shots must be >= 0, got {shots}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    src = Path(path) if path else (find_task_data(task, data_dir) if data_dir is not None else None)
    if src is not None and not src.exists():
        raise DataError(f"data for task {task.name} not found at {src}")
    name = task.name
    if name == "mmlu":
        if src is None:
            test = load_hub("mmlu")
            dev = load_hub("mmlu", "dev") if shots else {}
        else:
            test = read_mmlu(src, "test")
            dev = read_mmlu(src, "dev") if shots else {}
        if shots:
            short = [s for s in test if len(dev.get(s, [])) < shots]
            if short:
                raise DataError(f"{shots}-shot MMLU needs {shots} dev examples per subject; "
                                f"too few for {', '.join(short[:5])}")
        # --limit is per subject, as lm-eval's (mmlu is a group of one task per subject).
        chosen = [d for docs in test.values() for d in docs[: limit or None]]
        return [mmlu_example(d, dev.get(d["subject"], [])[:shots]) for d in chosen]
    if task.kind == "perplexity":
        if src is None:
            return load_hub(name)
        text = read_text(src)
        # The local TinyShakespeare file is the whole play text: its last 10% is held out.
        return tinyshakespeare_split(text, "val") if name == "tinyshakespeare" and path is None else text
    reader, build = {
        "boolq": (read_boolq, boolq_example),
        "winogrande": (read_winogrande, winogrande_example),
        "hellaswag": (read_hellaswag, hellaswag_example),
        "arc_easy": (read_arc, arc_example),
        "dolly": (read_dolly, dolly_example),
    }[name]
    if src is None:
        docs = load_hub(name)
        if name == "dolly":
            docs = docs[-500:]  # the Hub has only a train split: its tail serves as eval
        docs = docs[: limit or None]
    else:
        docs = reader(src, limit=limit)
    return [build(d) for d in docs]

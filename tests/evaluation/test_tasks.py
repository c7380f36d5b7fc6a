"""Dataset readers and lm-evaluation-harness prompt formats (pure Python, no model)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cbd_ray import tasks as T
from cbd_ray.tasks import DataError, UnknownTaskError


def source_count(source_md: Path, name: str) -> int:
    """The record count SOURCE.md gives for file ``name`` ("name — N records" or "| name | N |")."""
    text = source_md.read_text()
    m = re.search(re.escape(name) + r"\s*(?:—|\|)\s*([\d,]+)", text)
    assert m, f"{source_md} gives no count for {name}"
    return int(m.group(1).replace(",", ""))


def test_readers_parse_every_dataset_with_the_counts_source_md_gives(shared_data):
    jsonl = {
        ("boolq", "dev"): ("boolq", "boolq_dev.jsonl"),
        ("winogrande", "dev"): ("winogrande", "winogrande_dev.jsonl"),
        ("winogrande", "train_xs"): ("winogrande", "winogrande_train_xs.jsonl"),
        ("hellaswag", "val"): ("hellaswag", "hellaswag_val.jsonl"),
        ("arc_easy", "test"): ("arc_easy", "arc_easy_test.jsonl"),
        ("dolly", "eval"): ("dolly", "dolly_eval.jsonl"),
        ("dolly", "train"): ("dolly", "dolly_train_1k.jsonl"),
        ("dolly", "prompts"): ("dolly", "dolly_prompts_only.jsonl"),
    }
    for (name, split), (folder, fname) in jsonl.items():
        recs = T.read_dataset(shared_data, name, split)
        assert len(recs) == source_count(shared_data / folder / "SOURCE.md", fname), (name, split)
    # Every record of every multiple-choice file becomes a valid example.
    for name, build in (("boolq", T.boolq_example), ("winogrande", T.winogrande_example),
                        ("hellaswag", T.hellaswag_example), ("arc_easy", T.arc_example)):
        split = {"boolq": "dev", "winogrande": "dev", "hellaswag": "val", "arc_easy": "test"}[name]
        for ex in map(build, T.read_dataset(shared_data, name, split)):
            assert 0 <= ex.gold < len(ex.requests)
    boolq = T.read_dataset(shared_data, "boolq", "dev")
    trues = sum(r["answer"] for r in boolq)
    assert f"{trues:,} true / {len(boolq) - trues} false" in (shared_data / "boolq/SOURCE.md").read_text()

    mmlu_md = shared_data / "mmlu/SOURCE.md"
    n_subjects = int(re.search(r"all (\d+) subjects", mmlu_md.read_text()).group(1))
    for split in ("test", "val", "dev"):
        by_subject = T.read_dataset(shared_data, "mmlu", split)
        assert len(by_subject) == n_subjects
        assert sum(map(len, by_subject.values())) == source_count(mmlu_md, f"{split}/")
        for docs in by_subject.values():
            for d in docs:
                assert len(d["choices"]) == 4 and 0 <= d["answer"] < 4

    wiki_md = (shared_data / "wikitext2/SOURCE.md").read_text()
    for split, fname in (("test", "wiki.test.raw"), ("valid", "wiki.valid.raw"),
                         ("test_tokens", "wiki.test.tokens"), ("valid_tokens", "wiki.valid.tokens")):
        text = T.read_dataset(shared_data, "wikitext2", split)
        row = re.search(re.escape(fname) + r" \| ([\d,]+) \| \w+ \| ([\d,]+) \|", wiki_md)
        assert len(text.encode("utf-8")) == int(row.group(1).replace(",", ""))
        assert len(text.split()) == int(row.group(2).replace(",", ""))

    ts_md = (shared_data / "tinyshakespeare/SOURCE.md").read_text()
    nbytes, nlines = (int(x.replace(",", "")) for x in re.search(r"([\d,]+) bytes, ([\d,]+) lines", ts_md).groups())
    train = T.read_dataset(shared_data, "tinyshakespeare", "train")
    val = T.read_dataset(shared_data, "tinyshakespeare", "val")
    whole = train + val
    assert len(whole.encode("utf-8")) == nbytes and whole.count("\n") == nlines
    assert 0.09 < len(val) / len(whole) < 0.11


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError) as e:
        T.parse_tasks("boolq,squad")
    msg = str(e.value)
    assert "'squad'" in msg
    for name in T.TASKS:
        assert name in msg
    with pytest.raises(UnknownTaskError):
        T.parse_tasks("")


def test_missing_field_names_file_and_line(tmp_path):
    p = tmp_path / "boolq.jsonl"
    good = {"question": "is it", "passage": "It is.", "answer": True}
    bad = {"question": "is it", "answer": False}
    p.write_text("\n".join(json.dumps(r) for r in (good, good, bad, good)) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}:3: .*missing field\(s\) passage"):
        T.read_boolq(p)
    # a wrong type is named too
    p.write_text(json.dumps({**good, "answer": "yes"}) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}:1: field 'answer' must be bool"):
        T.read_boolq(p)
    # a task run on a file with a bad line reports it through load_examples as well
    p.write_text(json.dumps(good) + "\nnot json\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}:2: not valid JSON"):
        T.load_examples(T.TASKS["boolq"], path=str(p))
    csv_file = tmp_path / "anatomy_test.csv"
    csv_file.write_text('q1,a,b,c,d,A\n"q2, with comma",a,b,c,B\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(csv_file))}:2: expected 6 fields"):
        T.read_mmlu_csv(csv_file)


def test_empty_choice_list_is_an_error(tmp_path):
    p = tmp_path / "arc.jsonl"
    p.write_text(json.dumps({"query": "Question: why?", "choices": ["a", "b"], "gold": 1}) + "\n"
                 + json.dumps({"query": "Question: why not?", "choices": [], "gold": 0}) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}:2: the choice list is empty"):
        T.load_examples(T.TASKS["arc_easy"], path=str(p))
    with pytest.raises(DataError, match="empty"):
        T.mc_example("ctx", [], 0)


def test_winogrande_partial_scoring_context_and_continuation():
    doc = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "1"}
    ex = T.winogrande_example(doc)
    assert [r.context for r in ex.requests] == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    # the shared continuation is the rest of the sentence after the blank
    assert {r.continuation for r in ex.requests} == {" always got the harder cases."}
    assert ex.gold == 0
    assert T.winogrande_example({**doc, "answer": "2"}).gold == 1


def test_prompt_formats_follow_lm_eval():
    b = T.boolq_example({"passage": "Cats purr.", "question": "do cats purr", "answer": True})
    assert b.requests[0] == T.Request("Cats purr.\nQuestion: do cats purr?\nAnswer:", " no")
    assert b.requests[1].continuation == " yes" and b.gold == 1
    a = T.arc_example({"query": "Question: What is ice?", "choices": ["solid water", "gas"], "gold": 0})
    assert a.requests[0] == T.Request("Question: What is ice?\nAnswer:", " solid water")
    assert a.norm_bytes == (len("solid water"), len("gas"))
    h = T.hellaswag_example({"activity_label": "Cooking", "ctx": "A man cracks an egg. he",
                             "endings": ["fries it.", "sings [title] loudly [step] now."], "label": 0})
    assert h.requests[0] == T.Request("Cooking: A man cracks an egg. he", " fries it.")
    assert h.requests[1].continuation == " sings. loudly now."  # lm-eval's "[title]"/"[step]" cleaning


def test_mmlu_few_shot_prompt_holds_k_dev_examples(shared_data):
    k = 3
    dev = T.read_mmlu(shared_data / "mmlu", "dev")
    exs = T.load_examples(T.TASKS["mmlu"], shared_data, limit=2, shots=k)
    subjects = [ex.meta["subject"] for ex in exs]
    assert len(exs) == 2 * len(dev) and all(subjects.count(s) == 2 for s in dev)  # the limit is per subject
    for ex in exs[:8]:
        prompt = ex.requests[0].context
        subject = ex.meta["subject"]
        assert prompt.startswith(
            f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n")
        assert prompt.count("\nAnswer:") == k + 1 and prompt.endswith("\nAnswer:")
        blocks = prompt.split("\n\n")[1:]
        for shot, block in zip(dev[subject][:k], blocks):
            assert block == T.mmlu_question_text(shot) + " " + "ABCD"[shot["answer"]]
        assert [r.continuation for r in ex.requests] == [" A", " B", " C", " D"]
    zero = T.load_examples(T.TASKS["mmlu"], shared_data, limit=1, shots=0)[0]
    assert zero.requests[0].context.count("\nAnswer:") == 1
    with pytest.raises(DataError, match="6-shot"):
        T.load_examples(T.TASKS["mmlu"], shared_data, limit=1, shots=6)


def test_dolly_prompt_uses_the_instruction_template(shared_data):
    exs = T.load_examples(T.TASKS["dolly"], shared_data)
    recs = T.read_dataset(shared_data, "dolly", "eval")
    assert len(exs) == len(recs)
    with_ctx = next(i for i, r in enumerate(recs) if r["context"])
    no_ctx = next(i for i, r in enumerate(recs) if not r["context"])
    p = exs[with_ctx].prompt
    assert p.startswith("Below is an instruction that describes a task, paired with an input")
    r = recs[with_ctx]
    assert f"### Instruction:\n{r['instruction'].strip()}\n\n### Input:\n{r['context'].strip()}" in p
    assert p.endswith("### Response:\n")
    q = exs[no_ctx].prompt
    assert "### Input:" not in q and q.endswith(f"{recs[no_ctx]['instruction'].strip()}\n\n### Response:\n")
    assert exs[no_ctx].reference == recs[no_ctx]["response"]


def test_missing_data_dir_file_is_reported(tmp_path):
    with pytest.raises(DataError, match="boolq/boolq_dev.jsonl"):
        T.load_examples(T.TASKS["boolq"], tmp_path)

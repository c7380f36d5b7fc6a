"""Scoring names as lm-evaluation-harness uses them, MMLU's per-subject limit, prompts cut to
the window counted per task, and data folders with other file names found by glob."""
from __future__ import annotations

import logging
import shutil

import pytest

from cbd_ray import evaluate as E
from cbd_ray import tasks as T
from cbd_ray.tasks import DataError, mc_example
from cbd_ray.tiny import save_tiny_model


def test_a_non_ascii_choice_scores_differently_per_character_and_per_byte():
    # "née" is 3 characters but 4 bytes, "neee" 4 and 4: dividing by bytes favours the
    # non-ASCII choice, dividing by characters (lm-eval's acc_norm) does not
    ex = mc_example("ctx", ["née", "neee"], gold=0)
    m = E.mc_metrics([ex], [-6.0, -7.6])  # per char: -2.0 vs -1.9 -> 1; per byte: -1.5 vs -1.9 -> 0
    assert (m["acc"], m["acc_norm"], m["acc_bytes"]) == (1.0, 0.0, 1.0)
    assert set(T.TASKS["hellaswag"].metrics) == {"acc", "acc_norm", "acc_bytes"}


def test_prompts_cut_to_the_window_are_counted_per_task(tmp_path, tokenizer, caplog):
    d = save_tiny_model(tmp_path / "m", "gpt2", tokenizer=tokenizer, layers=1, hidden=32, heads=2, max_positions=64)
    model, tok = E.load_model(d, "cpu")
    long = " ".join(["the quick brown fox"] * 40)  # far more than 64 tokens
    data = [mc_example(long + "\nAnswer:", ["no", "yes"], 1), mc_example("Short?\nAnswer:", ["no", "yes"], 0)]
    with caplog.at_level(logging.INFO, logger="cbd_ray.evaluate"):
        metrics, n, extra = E._run_task(model, tok, T.TASKS["boolq"], data, 4, 4, False, None)
    assert n == 2 and extra["prompts_cut"] == 1
    assert "boolq: 1 of 2 prompts cut on the left to the model's 64-token window" in caplog.text


def test_mmlu_limit_is_per_subject(shared_data):
    exs = T.load_examples(T.TASKS["mmlu"], shared_data, limit=1)
    subjects = [ex.meta["subject"] for ex in exs]
    assert len(subjects) == len(set(subjects)) == len(list((shared_data / "mmlu" / "test").glob("*.csv")))


def test_data_dir_with_other_file_names_is_found_by_glob(tmp_path, shared_data):
    shutil.copy(shared_data / "boolq" / "boolq_dev.jsonl", tmp_path / "my_boolq_dev_split.jsonl")
    (tmp_path / "ARC").mkdir()
    shutil.copy(shared_data / "arc_easy" / "arc_easy_test.jsonl", tmp_path / "arc_easy_questions.jsonl")
    assert T.find_task_data(T.TASKS["boolq"], tmp_path) == tmp_path / "my_boolq_dev_split.jsonl"
    assert len(T.load_examples(T.TASKS["boolq"], tmp_path, limit=2)) == 2
    assert T.find_task_data(T.TASKS["arc_easy"], tmp_path).name == "arc_easy_questions.jsonl"
    shutil.copy(tmp_path / "my_boolq_dev_split.jsonl", tmp_path / "boolq_dev_copy.jsonl")
    with pytest.raises(DataError, match=r"2 files .* match .*boolq:PATH"):
        T.find_task_data(T.TASKS["boolq"], tmp_path)
    with pytest.raises(DataError, match=r"hellaswag not found in .*hellaswag/hellaswag_val.jsonl"):
        T.find_task_data(T.TASKS["hellaswag"], tmp_path)
    # the shared layout itself still wins first
    assert T.find_task_data(T.TASKS["boolq"], shared_data) == shared_data / "boolq" / "boolq_dev.jsonl"

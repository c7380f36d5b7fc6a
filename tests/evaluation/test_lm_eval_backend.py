"""The native scorer and lm-evaluation-harness agree: both backends on the same local records
with one tiny model give equal acc and acc_norm (acc_bytes too). Skipped without lm_eval."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from cbd_ray import cli  # noqa: E402
from cbd_ray.evaluate import evaluate_model  # noqa: E402
from cbd_ray.lm_eval_backend import LOCAL_TASKS, evaluate_lm_eval, write_task_configs  # noqa: E402
from cbd_ray.tiny import save_tiny_model  # noqa: E402

pytestmark = pytest.mark.slow
LIMIT = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gpt2_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("lm") / "m", "gpt2", tokenizer=gpt2_tokenizer, seed=3,
                           layers=2, hidden=64, heads=4, max_positions=512)


def test_both_backends_give_equal_acc_and_acc_norm(model_dir, shared_data, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = [t for t in LOCAL_TASKS if t != "mmlu"]
    theirs = evaluate_lm_eval(model_dir, tasks, shared_data, limit=LIMIT, batch_size=4)
    ours = evaluate_model(model_dir, tasks, data_dir=shared_data, limit=LIMIT, batch_size=4, progress=False,
                          device="cpu")
    for a, b in zip(theirs, ours):
        assert a["task"] == b["task"] and a["n"] == b["n"] == LIMIT
        for k in ("acc", "acc_norm", "acc_bytes"):
            if k in b["metrics"]:
                assert a["metrics"][k] == pytest.approx(b["metrics"][k]), (a["task"], k)
        assert "acc_norm" in a["metrics"] or a["task"] == "winogrande"


def test_mmlu_group_of_subject_tasks_matches_the_native_per_subject_limit(model_dir, shared_data, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (theirs,) = evaluate_lm_eval(model_dir, ["mmlu"], shared_data, limit=1, batch_size=8)
    (ours,) = evaluate_model(model_dir, ["mmlu"], data_dir=shared_data, limit=1, batch_size=8, progress=False,
                             device="cpu")
    assert theirs["n"] == ours["n"] == len(ours["by_subject"])  # one question per subject in both
    assert theirs["metrics"]["acc"] == pytest.approx(ours["metrics"]["acc"])


def test_cli_backend_lm_eval_prints_json_lines(model_dir, shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc = cli.main(["evaluate", "--backend", "lm-eval", "--model", str(model_dir), "--tasks", "boolq",
                   "--data-dir", str(shared_data), "--limit", "3", "--device", "cpu", "--no-progress"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert [x["task"] for x in lines] == ["boolq"] and lines[0]["backend"] == "lm-eval" and lines[0]["n"] == 3
    assert cli.main(["evaluate", "--backend", "lm-eval", "--model", str(model_dir), "--tasks", "dolly",
                     "--data-dir", str(shared_data)]) == 2
    assert "no local task file for dolly" in capsys.readouterr().err
    names = write_task_configs(tmp_path, shared_data, ["arc_easy"])
    assert names == ["cbd_arc_easy"] and "acc_norm" in (tmp_path / "cbd_arc_easy.yaml").read_text()

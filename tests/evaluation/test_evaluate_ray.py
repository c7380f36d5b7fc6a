"""Evaluating many models as a pool of Ray tasks on the shared local Ray."""
from __future__ import annotations

import json

import pytest

from cbd_ray.evaluate import evaluate_model
from cbd_ray.stages.evaluate import evaluate_many
from cbd_ray.tiny import save_tiny_model

from conftest import ROOT

pytestmark = pytest.mark.ray  # the suite-wide timeout applies: waiting for the shared Ray lock can take a while


def test_evaluate_many_writes_a_table_per_model(tmp_path, shared_data, tokenizer, ray_clean, capsys):
    shape = dict(layers=2, hidden=32, heads=4, max_positions=128)
    dirs = {name: str(save_tiny_model(tmp_path / name, fam, tokenizer=tokenizer, seed=i, **shape))
            for i, (name, fam) in enumerate((("tiny-gpt2", "gpt2"), ("tiny-llama", "llama")))}
    tasks = ["boolq", "arc_easy", "mmlu", "tinyshakespeare"]
    out = tmp_path / "eval"
    rows = evaluate_many(dirs, tasks, out, data_dir=shared_data, limit=3, shots=1, batch_size=8, progress=False)

    assert sorted((r["model"], r["task"]) for r in rows) == sorted((m, t) for m in dirs for t in tasks)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["model"] for s in summary] == list(dirs)
    md = (out / "summary.md").read_text()
    assert (out / "summary.png").read_bytes().startswith(b"\x89PNG")
    for name, d in dirs.items():
        saved = json.loads((out / f"{name}.json").read_text())
        assert saved["dir"] == d and saved["settings"]["tasks"] == tasks
        table = (out / f"{name}.md").read_text()
        assert "| task | metric | value | stderr | examples |" in table
        for t in tasks:
            assert f"| {t} |" in table
        assert name in md
    # the Ray worker's numbers are those of the same evaluation run in-process
    local = evaluate_model(dirs["tiny-llama"], ["arc_easy", "tinyshakespeare"], data_dir=shared_data, limit=3,
                           progress=False)
    remote = {r["task"]: r["metrics"] for r in rows if r["model"] == "tiny-llama"}
    for r in local:
        assert remote[r["task"]] == pytest.approx(r["metrics"], rel=1e-6)

    # a rerun with the same settings reuses the tables; other settings need overwrite
    before = (out / "tiny-gpt2.json").stat().st_mtime_ns
    again = evaluate_many(dirs, tasks, out, data_dir=shared_data, limit=3, shots=1, progress=False)
    assert (out / "tiny-gpt2.json").stat().st_mtime_ns == before
    assert [r["metrics"] for r in again] == [r["metrics"] for r in rows]
    # the pipeline form reads the same settings from ctx.config (cached here: no new work)
    from types import SimpleNamespace

    from cbd_ray.stages.evaluate import run

    ctx = SimpleNamespace(config={"models": dirs, "tasks": tasks, "data_dir": str(shared_data), "limit": 3,
                                  "shots": 1, "cpus_per_task": 1, "progress": False},
                          out=out, run_dir=tmp_path)
    metrics = run(ctx)
    assert metrics["tiny-llama/arc_easy/acc"] == next(
        r["metrics"]["acc"] for r in rows if r["model"] == "tiny-llama" and r["task"] == "arc_easy")
    # the job entry point parses NAME=DIR lists and prints the summary (cached here too)
    import importlib.util

    spec = importlib.util.spec_from_file_location("job_evaluate", ROOT / "jobs/evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    models = ",".join(f"{n}={d}" for n, d in dirs.items())
    assert job.main(["--models", models, "--tasks", ",".join(tasks), "--out", str(out), "--data-dir",
                     str(shared_data), "--limit", "3", "--shots", "1"]) == 0
    assert "| tiny-gpt2 |" in capsys.readouterr().out
    assert job.main(["--models", models, "--tasks", "boolq,nope", "--out", str(out)]) == 2
    with pytest.raises(FileExistsError, match="overwrite"):
        evaluate_many(dirs, tasks, out, data_dir=shared_data, limit=2, progress=False)
    with pytest.raises(ValueError, match="known tasks"):
        evaluate_many(dirs, ["boolq", "nope"], tmp_path / "x", data_dir=shared_data)

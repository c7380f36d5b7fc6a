"""`cbd distill` through cbd_ray.cli.main: one short run on the local Ray printing a JSON
line, and bad input refused with exit code 2 before any training."""
from __future__ import annotations

import json

import pytest

from cbd_ray.cli import main

from distill_models import DOLLY_EVAL, DOLLY_TRAIN, make_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer):
    return make_pair(tmp_path_factory.mktemp("pair"), tokenizer)


def _args(pair, shared_data, out, *extra):
    return ["distill", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(shared_data / DOLLY_TRAIN),
            "--out", str(out), *extra]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_cli_runs_one_step_of_the_chain_and_prints_metrics(ray_clean, pair, shared_data, tmp_path, capsys):
    out = tmp_path / "student_out"
    rc = main(_args(pair, shared_data, out, "--objective", "sft", "--steps", "3", "--batch-size", "2",
                    "--max-len", "64", "--lr", "1e-3", "--workers", "1", "--device", "cpu",
                    "--eval-data", str(shared_data / DOLLY_EVAL), "--set", "data_limit=16", "--set", "eval_limit=4",
                    "--set", "checkpoint_every=3", "--storage", str(tmp_path / "ray")))
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(line)
    assert metrics["step"] == 3 and metrics["objective"] == "sft" and metrics["teacher_tokens"] == 0
    assert metrics["student_tokens"] > 0 and metrics["eval_ce"] > 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "distill.json"} <= {p.name for p in out.iterdir()}


def test_cli_refuses_bad_input_before_training(pair, shared_data, tmp_path, capsys):
    # missing data file
    rc = main(["distill", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(tmp_path / "x.jsonl"),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "x.jsonl" in capsys.readouterr().err
    # an existing output without --overwrite
    (tmp_path / "exists").mkdir()
    assert main(_args(pair, shared_data, tmp_path / "exists")) == 2
    assert "--overwrite" in capsys.readouterr().err
    # an unknown setting names its key
    assert main(_args(pair, shared_data, tmp_path / "o", "--set", "warmpu=3")) == 2
    assert "warmpu: unknown key" in capsys.readouterr().err
    # NPUs where there are none: this machine's torch-npu (no Ray yet) or the running Ray's
    # resources (a session Ray of the test suite) say so, before any training
    assert main(_args(pair, shared_data, tmp_path / "o", "--device", "npu")) == 2
    err = capsys.readouterr().err
    assert "torch-npu is not installed" in err or "needs the Ray resource 'NPU'" in err
    # a student directory without weights
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    rc = main(["distill", "--teacher", str(pair[0]), "--student", str(tmp_path / "empty"),
               "--data", str(shared_data / DOLLY_TRAIN), "--out", str(tmp_path / "o")])
    assert rc == 2 and "safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

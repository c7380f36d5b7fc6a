"""The chain job through `ray job submit` to a local head started by cluster/local/start.sh.

This test does not use the session Ray: tests/local_head.py starts its own head with start.sh
(free ports, a 1 GiB object store, token authentication), submits jobs/build_chain.py on the
smoke config with `--working-dir .` and the token, and stops only that head with stop.sh. The
machine-wide lock (the ``ray_lock`` fixture of tests/conftest.py) keeps any other test
session's Ray from running at the same time.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import SMOKE_ONE_ANCHOR
from local_head import ROOT, local_head, submit

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# RAY_AUTH_MODE stays out: the job's driver must use the head's token mode, not the tests' "disabled".
ENV_KEYS = ("RAY_USAGE_STATS_ENABLED", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_DEDUP_LOGS",
            "RAY_TRAIN_ENABLE_PRINT_PATCH", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR")


@pytest.mark.timeout(600, func_only=True)  # waiting for the Ray lock is not the test
def test_build_chain_through_ray_job_submit(tmp_path, ray_lock):
    job_env = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    storage = tmp_path / "runs"
    extra = ("--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": job_env}))
    argv = [sys.executable, "jobs/build_chain.py", "--config", "configs/smoke.yaml", "--storage", str(storage),
            *SMOKE_ONE_ANCHOR]  # overrides with spaces and braces pass through the entrypoint
    with local_head(tmp_path / "head") as head:
        r = submit(head, argv, extra=extra)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out and "teacher cost" in out and "chain total" in out
    run_dir = storage / "smoke"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    order = manifest["order"]
    assert order[:2] == ["data", "source"] and order[-3:] == ["grid", "evaluate", "report"]
    assert all(manifest["stages"][s]["status"] == "done" for s in order)
    assert manifest["stages"]["chain_1"]["teacher_tokens"] > 0
    assert (run_dir / "report.md").is_file()
    evaluation = json.loads((run_dir / "evaluation" / "evaluation.json").read_text())
    assert sorted(r["model"] for r in evaluation if r["kind"] == "target") == ["t-2x64", "t-3x48"]
    # the job's log is the quiet console: the chain's progress (workers' included) and one line a
    # stage; Ray Train's, DeepSpeed's and transformers' lines only in the run's log file
    assert "[distill] step 4/4" in out and out.count("[chain_1] done in ") == 1 and "-> models/a1" in out
    internals = ("TrainController", "RayTrainWorker", "Setting accelerator to CPU", "Loading weights")
    assert [s for s in internals if s in out] == []
    assert "(RayTrainWorker pid=" in (run_dir / "logs" / "run.log").read_text()

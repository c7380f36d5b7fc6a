"""A local Ray head from cluster/local/start.sh, used the way a user uses one, started once for
this module and stopped by cluster/local/stop.sh at its end:

- start.sh starts a head on free ports with token authentication, the project's venv first on
  its PATH and its own address in its processes' RAY_ADDRESS; `ray job submit` without the token (or with a wrong one) is refused, with the token
  a trivial job runs;
- the chain job goes through `ray job submit` with `--working-dir .` and the token, and its log
  is the quiet console;
- stop.sh then stops exactly the processes start.sh recorded (and their children) and nothing
  else: a process that looks like another Ray on the machine (`ray stop` would kill it by
  name) is still running.

The module does not use the session Ray (``ray_session``): under xdist it runs beside it on the
other worker (``ray_apart``), and start.sh gives the head's processes its own address. The
machine-wide lock (/tmp/cbd_ray_tests.lock) keeps other test sessions' Rays away; waiting for
it does not count against a test's timeout.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys

import psutil
import pytest

from conftest import ROOT, SMOKE_ONE_ANCHOR
from local_head import RAY, VENV, local_head, submit

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# RAY_AUTH_MODE stays out: the job's driver must use the head's token mode, not the tests' "disabled".
ENV_KEYS = ("RAY_USAGE_STATS_ENABLED", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_DEDUP_LOGS",
            "RAY_TRAIN_ENABLE_PRINT_PATCH", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR")


def _running(pid: int, lstart: str | None = None) -> bool:
    """The process runs (a zombie has exited) and, when given, started at ``lstart``."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return False
    if lstart is None:
        return True
    r = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True)
    return r.stdout.strip() == lstart.strip()


@pytest.fixture(scope="module")
def head(tmp_path_factory, ray_apart):
    """The head, a decoy named like a Ray process, the pids that ran before the head, and
    ``stop()`` (stop.sh, once; also at the module's end whatever happened)."""
    decoy = subprocess.Popen(["bash", "-c", "exec -a 'ray::IDLE' sleep 600"])
    before = set(psutil.pids())  # no process that ran before the head can be one of its own
    stack = contextlib.ExitStack()
    try:
        h = stack.enter_context(local_head(tmp_path_factory.mktemp("head")))
        yield {"head": h, "decoy": decoy, "before": before, "stop": stack.close}
    finally:
        stack.close()
        decoy.kill()
        decoy.wait()


@pytest.mark.timeout(240, func_only=True)
def test_start_sh_head_runs_jobs_only_with_its_token(head):
    h = head["head"]
    environ = psutil.Process(h.recorded[0][0]).environ()
    assert environ["PATH"].startswith(f"{VENV}/bin:"), environ["PATH"]  # the project's venv first on the head's PATH
    raylet = next(pid for pid, _, name in h.recorded if name == "raylet")
    assert psutil.Process(raylet).environ()["RAY_ADDRESS"] == h.gcs  # its workers ask this head, no Ray beside it
    assert stat.S_IMODE(h.token_path.stat().st_mode) == 0o600
    job = ["python", "-c", "print('token-' + 'ok')"]
    # the job server's answers (ray/_private/authentication/http_token_authentication.py)
    for token, answer in ((None, "Unauthorized: Missing authentication token"),
                          ("0" * 64, "Forbidden: Invalid authentication token")):
        r = submit(h, job, token=token, timeout=120)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and answer in out and "token-ok" not in out, out[-2000:]
    r = submit(h, job, timeout=180)
    assert r.returncode == 0 and "token-ok" in r.stdout and "succeeded" in r.stdout, (r.stdout + r.stderr)[-3000:]
    listing = subprocess.run([RAY, "job", "list", "--address", h.url], env=h.client_env(),
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and listing.stdout.count("submission_id=") == 1, listing.stdout  # refused ones never ran


@pytest.mark.timeout(600, func_only=True)
def test_build_chain_through_ray_job_submit(head, tmp_path):
    job_env = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    storage = tmp_path / "runs"
    extra = ("--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": job_env}))
    argv = [sys.executable, "jobs/build_chain.py", "--config", "configs/smoke.yaml", "--storage", str(storage),
            *SMOKE_ONE_ANCHOR]  # overrides with spaces and braces pass through the entrypoint
    r = submit(head["head"], argv, extra=extra)
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


@pytest.mark.timeout(180, func_only=True)
def test_stop_sh_stops_only_its_head(head):
    h = head["head"]
    head["stop"]()
    assert {"gcs_server", "raylet"} <= {name for _, _, name in h.recorded}, h.recorded
    assert not [pid for pid, lstart, _ in h.recorded if _running(pid, lstart)], h.stop_output
    assert h.stopped_pids() and not h.stopped_pids() & head["before"], h.stop_output
    assert head["decoy"].poll() is None, "stop.sh stopped a process that was not its head's"

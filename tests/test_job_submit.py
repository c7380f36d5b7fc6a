"""The chain job through `ray job submit` to a `ray start --head` bound to loopback.

This test does not use the session Ray: it starts its own head (its own ports, a 1 GiB
object store), submits jobs/build_chain.py on the smoke config with `--working-dir .`, and
stops only the processes of that head. The machine-wide lock of tests/conftest.py keeps any
other test session's Ray from running at the same time; when this process already holds it
(the session fixture started earlier), it is not taken twice.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
LOCK = Path("/tmp/cbd_ray_tests.lock")
RAY = str(Path(sys.executable).with_name("ray"))
ENV_KEYS = ("RAY_USAGE_STATS_ENABLED", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_DEDUP_LOGS",
            "RAY_TRAIN_ENABLE_PRINT_PATCH", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _held_by_me(path: Path) -> bool:
    """True when this process already holds the flock on ``path`` (read from /proc/locks)."""
    if not path.exists():
        return False
    ino = path.stat().st_ino
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[4] == str(os.getpid()) and parts[5].endswith(f":{ino}"):
                return True
    return False


@contextlib.contextmanager
def machine_lock():
    if _held_by_me(LOCK):
        yield
        return
    with open(LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def loopback_head(env: dict[str, str]):
    """`ray start --head --block` on 127.0.0.1 with free ports; yields the dashboard URL.
    On exit, terminates exactly the processes of this head (its process tree)."""
    import psutil

    port, dash, client = _free_port(), _free_port(), _free_port()
    # Every fixed default port gets a free one too: the session Ray of the other tests may
    # already hold the dashboard agent's default port, and then this head's agent never
    # comes up ("No available agent to submit job").
    agent, agent_grpc, metrics, runtime_env = _free_port(), _free_port(), _free_port(), _free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
         "--num-cpus=2", f"--object-store-memory={1 << 30}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            r = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True, text=True)
            if r.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray head did not come up: {r.stderr[-2000:]}")
            time.sleep(1)
        yield url
    finally:
        procs = [psutil.Process(head.pid)]
        with contextlib.suppress(psutil.Error):
            procs += procs[0].children(recursive=True)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)


@pytest.mark.timeout(600)
def test_build_chain_through_ray_job_submit(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    job_env = {k: env[k] for k in ENV_KEYS if k in env}
    storage = tmp_path / "runs"
    submit = [RAY, "job", "submit", "--address", None, "--working-dir", str(ROOT),
              "--runtime-env-json", json.dumps({"env_vars": job_env}), "--",
              sys.executable, "jobs/build_chain.py", "--config", "configs/smoke.yaml", "--storage", str(storage)]
    with machine_lock(), loopback_head(env) as url:
        submit[submit.index("--address") + 1] = url
        for _ in range(10):
            r = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=480, cwd=ROOT)
            # the job server answers before its agent is ready on a busy machine; nothing was submitted
            if "No available agent to submit job" not in r.stdout + r.stderr:
                break
            time.sleep(2)
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
    assert sorted(r["model"] for r in evaluation if r["kind"] == "target") == ["t-1x48", "t-2x32", "t-2x64", "t-3x48"]

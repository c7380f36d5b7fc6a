"""A Ray head started by cluster/local/start.sh and stopped by cluster/local/stop.sh, for the
tests that need `ray job submit` (tests/cluster/test_local_head.py).

Each head gets free ports for everything that has a fixed default (a session Ray of the other
tests may hold the defaults), a small object store, and its own run dir with the token. Tests
that use it hold the machine-wide Ray lock (the ``ray_lock`` fixture of tests/conftest.py).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
VENV = Path(sys.executable).parents[1]  # the environment running the tests is the project's
PORT_VARS = ("CBD_RAY_PORT", "CBD_RAY_DASHBOARD_PORT", "CBD_RAY_AGENT_PORT", "CBD_RAY_CLIENT_PORT",
             "CBD_RAY_AGENT_GRPC_PORT", "CBD_RAY_METRICS_PORT", "CBD_RAY_RUNTIME_ENV_AGENT_PORT")


def base_env() -> dict[str, str]:
    """The test environment without any Ray address or token: each caller says which it wants."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    return env


@dataclass
class Head:
    dir: Path
    url: str
    gcs: str = ""  # 127.0.0.1:port
    stop_output: str = ""
    recorded: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def token_path(self) -> Path:
        return self.dir / "auth_token"

    def client_env(self, token: str | None = "file") -> dict[str, str]:
        """Environment for a Ray client: the head's token ("file"), a given token, or none."""
        env = base_env()
        if token is None:
            env["RAY_AUTH_MODE"] = "disabled"
        elif token == "file":
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        else:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        return env

    def read_recorded(self) -> list[tuple[int, str, str]]:
        """(pid, start time, name) of every process start.sh recorded, `ray start` first."""
        rows = (ln.split("|") for ln in (self.dir / "pids").read_text().splitlines() if ln)
        return [(int(r[0]), r[1], r[2]) for r in rows]

    def stopped_pids(self) -> set[int]:
        m = re.search(r"processes \(([\d ]*)\)", self.stop_output)
        return {int(p) for p in m[1].split()} if m else set()


def submit(head: Head, argv: list[str], token: str | None = "file", tries: int = 10,
           extra: tuple[str, ...] = (), timeout: float = 480) -> subprocess.CompletedProcess:
    """`ray job submit` to the head; retried while its job agent is still coming up."""
    cmd = [RAY, "job", "submit", "--address", head.url, *extra, "--", *argv]
    for _ in range(tries):
        r = subprocess.run(cmd, env=head.client_env(token), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        # the job server answers before its agent is ready on a busy machine; nothing was submitted
        if "No available agent to submit job" not in r.stdout + r.stderr:
            return r
        time.sleep(2)
    return r


@contextlib.contextmanager
def local_head(run_dir: Path, num_cpus: int = 2):
    """start.sh on free ports; yields the Head; stop.sh on exit (its output kept on the Head)."""
    env = {**base_env(), "CBD_VENV": str(VENV), "CBD_RAY_DIR": str(run_dir), "CBD_RAY_NUM_CPUS": str(num_cpus),
           "CBD_RAY_OBJECT_STORE_BYTES": str(1 << 30), **{k: str(free_port()) for k in PORT_VARS}}
    r = subprocess.run([str(ROOT / "cluster/local/start.sh")], env=env, capture_output=True, text=True, timeout=240)
    head = Head(run_dir, f"http://127.0.0.1:{env['CBD_RAY_DASHBOARD_PORT']}", f"127.0.0.1:{env['CBD_RAY_PORT']}")
    try:
        if r.returncode != 0:
            raise RuntimeError(f"start.sh failed ({r.returncode}): {r.stdout[-2000:]}{r.stderr[-2000:]}")
        head.recorded = head.read_recorded()
        yield head
    finally:
        s = subprocess.run([str(ROOT / "cluster/local/stop.sh")], env=env, capture_output=True, text=True, timeout=120)
        head.stop_output = s.stdout + s.stderr

"""cluster/local/start.sh and stop.sh, end to end on this machine.

start.sh starts a head on free ports with token authentication; `ray job submit` without the
token (or with a wrong one) is refused, with the token a trivial job runs; stop.sh then stops
exactly the processes start.sh recorded (and their children) and nothing else: a process that
looks like another Ray on the machine (`ray stop` would kill it by name) is still running.

This test does not use the session Ray (``ray_session``) but holds the same machine-wide lock,
/tmp/cbd_ray_tests.lock (the ``ray_lock`` fixture), for its whole duration, so no other test
session's Ray starts meanwhile; waiting for the lock does not count against the timeout.
"""
from __future__ import annotations

import stat
import subprocess

import psutil
import pytest

from local_head import RAY, VENV, Head, local_head, submit

pytestmark = [pytest.mark.ray, pytest.mark.slow]


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


def _check_token_auth(head: Head) -> None:
    assert stat.S_IMODE(head.token_path.stat().st_mode) == 0o600
    job = ["python", "-c", "print('token-' + 'ok')"]
    # the job server's answers (ray/_private/authentication/http_token_authentication.py)
    for token, answer in ((None, "Unauthorized: Missing authentication token"),
                          ("0" * 64, "Forbidden: Invalid authentication token")):
        r = submit(head, job, token=token, timeout=120)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and answer in out and "token-ok" not in out, out[-2000:]
    r = submit(head, job, timeout=180)
    assert r.returncode == 0 and "token-ok" in r.stdout and "succeeded" in r.stdout, (r.stdout + r.stderr)[-3000:]
    listing = subprocess.run([RAY, "job", "list", "--address", head.url], env=head.client_env(),
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and listing.stdout.count("submission_id=") == 1, listing.stdout  # refused ones never ran


@pytest.mark.timeout(180, func_only=True)
def test_start_sh_head_refuses_jobs_without_the_token_and_stop_sh_stops_only_it(tmp_path, ray_lock):
    decoy = subprocess.Popen(["bash", "-c", "exec -a 'ray::IDLE' sleep 600"])
    before = set(psutil.pids())  # no process that ran before the head can be one of its own
    try:
        with local_head(tmp_path / "head") as head:
            head_pid = head.recorded[0][0]
            path = psutil.Process(head_pid).environ()["PATH"]
            assert path.startswith(f"{VENV}/bin:"), path  # the project's venv first on the head's PATH
            _check_token_auth(head)
        assert {"gcs_server", "raylet"} <= {name for _, _, name in head.recorded}, head.recorded
        assert not [pid for pid, lstart, _ in head.recorded if _running(pid, lstart)], head.stop_output
        assert head.stopped_pids() and not head.stopped_pids() & before, head.stop_output
        assert decoy.poll() is None, "stop.sh stopped a process that was not its head's"
    finally:
        decoy.kill()
        decoy.wait()


"""One driver per run directory (cbd_ray.lease): a held lease refuses a second driver with
one line naming the holder; a stale one, or one whose process is gone, is taken over with a
warning; the heartbeat advances and notices a takeover; release removes only our own lease;
the same on S3 (moto); and the chain job refuses before any work. No Ray."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cbd_ray.errors import CBDError
from cbd_ray.lease import LEASE_FILE, LeaseHeld, LeaseLost, RunLease, _pid_namespace, hold_run_dir, read_lease

from conftest import ROOT

pytestmark = pytest.mark.timeout(120)

SMOKE = ROOT / "configs" / "smoke.yaml"
FAST = dict(settle_s=0.05)


def _foreign_lease(path: Path, age_s: float, host: str = "other-host", pid: int = 4242, **extra) -> dict:
    """A lease another driver wrote ``age_s`` seconds after its last heartbeat."""
    beat = time.time() - age_s
    data = {"token": "f" * 32, "holder": {"host": host, "pid": pid, "pidns": None}, "started": beat - 10,
            "started_at": "2026-12-01T10:00:00Z", "heartbeat": beat, "timeout_s": 120.0, **extra}
    path.mkdir(parents=True, exist_ok=True)
    (path / LEASE_FILE).write_text(json.dumps(data))
    return data


def test_second_driver_is_refused_naming_the_holder(tmp_path):
    with RunLease(str(tmp_path / "run"), timeout_s=60, **FAST) as first:
        t0 = time.monotonic()
        with pytest.raises(LeaseHeld) as err:
            RunLease(str(tmp_path / "run"), timeout_s=60, **FAST).acquire()
        assert time.monotonic() - t0 < 30  # refused, not waited out
        msg = str(err.value)
        assert isinstance(err.value, CBDError) and "\n" not in msg
        assert f"host {socket.gethostname()}" in msg and f"pid {os.getpid()}" in msg
        assert "last heartbeat" in msg and "60 s" in msg and "stop that driver" in msg
        assert read_lease(first.uri)["token"] == first.token  # the holder keeps it


def test_stale_lease_is_taken_over_and_logged(tmp_path, caplog):
    run = tmp_path / "run"
    _foreign_lease(run, age_s=500)
    with caplog.at_level(logging.WARNING, logger="cbd_ray.lease"):
        with RunLease(str(run), timeout_s=60, **FAST) as lease:
            assert read_lease(lease.uri)["token"] == lease.token
    text = caplog.text
    assert "taking over the stale lease" in text and "host other-host" in text and "pid 4242" in text
    assert "no heartbeat for 50" in text  # how stale (500 s, give or take the test's own time)
    assert not (run / LEASE_FILE).exists()


def test_fresh_lease_of_a_longer_timeout_holder_is_respected(tmp_path):
    """A holder with a 600 s timeout beats every 150 s: a 60 s driver must not take it over at 100 s."""
    run = tmp_path / "run"
    _foreign_lease(run, age_s=100, timeout_s=600.0)
    with pytest.raises(LeaseHeld, match="host other-host, pid 4242"):
        RunLease(str(run), timeout_s=60, **FAST).acquire()


def test_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    run = tmp_path / "run"
    data = _foreign_lease(run, age_s=1, host=socket.gethostname(), pid=dead)
    data["holder"]["pidns"] = _pid_namespace()
    (run / LEASE_FILE).write_text(json.dumps(data))
    if _pid_namespace() is None:
        pytest.skip("no /proc/self/ns/pid here")
    with caplog.at_level(logging.WARNING, logger="cbd_ray.lease"):
        with RunLease(str(run), timeout_s=60, **FAST) as lease:
            assert read_lease(lease.uri)["token"] == lease.token
    assert f"pid {dead}" in caplog.text and "no longer exists" in caplog.text


def test_release_removes_only_our_own_lease(tmp_path, caplog):
    run = tmp_path / "run"
    lease = RunLease(str(run), timeout_s=60, **FAST).acquire()
    assert (run / LEASE_FILE).is_file()
    lease.release()
    assert not (run / LEASE_FILE).exists()

    lease = RunLease(str(run), timeout_s=60, **FAST).acquire()
    other = _foreign_lease(run, age_s=0)  # another driver took it over meanwhile
    with caplog.at_level(logging.WARNING, logger="cbd_ray.lease"):
        lease.release()
    assert read_lease(str(run / LEASE_FILE))["token"] == other["token"]
    assert "not ours" in caplog.text


def test_heartbeat_advances_and_notices_a_takeover(tmp_path, caplog):
    run = tmp_path / "run"
    with RunLease(str(run), timeout_s=0.4, heartbeat_s=0.05, **FAST) as lease:
        first = read_lease(lease.uri)["heartbeat"]
        deadline = time.monotonic() + 20
        while read_lease(lease.uri)["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_lease(lease.uri)["heartbeat"] > first  # the daemon thread beats
        before = read_lease(lease.uri)["heartbeat"]
        time.sleep(0.01)
        assert lease.beat() and read_lease(lease.uri)["heartbeat"] > before
        lease.check()  # still ours: nothing raised

        other = _foreign_lease(run, age_s=0)
        with caplog.at_level(logging.ERROR, logger="cbd_ray.lease"):
            assert lease.beat() is False
        assert lease.lost and "lease lost" in caplog.text and "host other-host" in caplog.text
        with pytest.raises(LeaseLost, match="another driver took over"):
            lease.check()
        lease._thread.join(timeout=20)
        assert not lease._thread.is_alive()  # it stopped heartbeating
        assert read_lease(lease.uri)["token"] == other["token"]  # never written over
    assert read_lease(str(run / LEASE_FILE))["token"] == other["token"]  # and not released


def test_nested_holders_in_one_process_share_the_lease(tmp_path):
    run = str(tmp_path / "run")
    with hold_run_dir(run, 60, settle_s=0.05) as outer:
        with hold_run_dir(run, 60, settle_s=0.05) as inner:
            assert inner is outer
        assert read_lease(outer.uri)["token"] == outer.token  # the inner exit did not release it
        with pytest.raises(LeaseHeld):  # a separate RunLease is another driver, even here
            RunLease(run, timeout_s=60, **FAST).acquire()
    assert not (tmp_path / "run" / LEASE_FILE).exists()


def test_lease_on_s3(s3_server):
    from cbd_ray.storage import uri_exists

    run = f"s3://cbd-runs/lease-test/run{s3_server}"
    with RunLease(run, timeout_s=60, settle_s=0.2) as lease:
        assert uri_exists(lease.uri) and read_lease(lease.uri)["token"] == lease.token
        with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}") as err:
            RunLease(run, timeout_s=60, settle_s=0.2).acquire()
        assert "endpoint_override" not in str(err.value)  # the query (it may carry keys) is never shown
        assert lease.beat() and read_lease(lease.uri)["heartbeat"] >= lease._record["started"]
    assert not uri_exists(lease.uri)


def test_lease_timeout_is_validated():
    from cbd_ray.errors import ConfigError
    from cbd_ray.schema import load_config

    assert load_config(SMOKE).run.lease_timeout_s == 120
    assert load_config(SMOKE, ["run.lease_timeout_s=30"]).run.lease_timeout_s == 30
    with pytest.raises(ConfigError, match="lease_timeout_s"):
        load_config(SMOKE, ["run.lease_timeout_s=0"])


@pytest.fixture
def ray_starts(monkeypatch) -> list:
    """Records every attempt to start or join Ray (the session's Ray may already be up, so
    ``ray.is_initialized()`` cannot tell whether a refused job started one)."""
    import cbd_ray.session
    import cbd_ray.stages.chain

    calls: list = []

    def connect(*a, **k):
        calls.append(a)
        raise AssertionError("a refused job must not start Ray")

    monkeypatch.setattr(cbd_ray.session, "connect_ray", connect)
    monkeypatch.setattr(cbd_ray.stages.chain, "connect_ray", connect)
    return calls


def test_chain_job_refuses_before_any_work(tmp_path, capsys, ray_starts):
    import importlib.util

    from cbd_ray.schema import load_config
    from cbd_ray.stages.chain import run_chain

    run = tmp_path / "smoke"
    _foreign_lease(run, age_s=2)
    with pytest.raises(LeaseHeld, match="host other-host, pid 4242"):
        run_chain(load_config(SMOKE), storage=str(tmp_path))
    assert sorted(p.name for p in run.iterdir()) == [LEASE_FILE]  # no manifest, no config, no data

    spec = importlib.util.spec_from_file_location("build_chain", ROOT / "jobs" / "build_chain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--config", str(SMOKE), "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another driver" in err[0] and "pid 4242" in err[0]
    assert sorted(p.name for p in run.iterdir()) == [LEASE_FILE]
    assert ray_starts == []  # Ray never started


def test_tune_and_reproduce_refuse_before_any_work(tmp_path, ray_starts):
    """`cbd tune` and `cbd reproduce` own their run directories the same way."""
    import yaml

    from cbd_ray.reproduce import load_reproduce_config, run_reproduce
    from cbd_ray.schema import load_config
    from cbd_ray.stages.tune import tune_chain

    _foreign_lease(tmp_path / "smoke", age_s=2)
    with pytest.raises(LeaseHeld, match="pid 4242"):
        tune_chain(load_config(SMOKE), storage=str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "smoke").iterdir()) == [LEASE_FILE]

    repro = tmp_path / "repro.yaml"
    repro.write_text(yaml.safe_dump({"run": {"name": "repro"}, "chain": str(SMOKE), "methods": ["rand"],
                                     "seeds": [0]}))
    cfg, chain = load_reproduce_config(repro)
    _foreign_lease(tmp_path / "runs" / "repro", age_s=2)
    with pytest.raises(LeaseHeld, match="pid 4242"):
        run_reproduce(cfg, chain, storage=str(tmp_path / "runs"))
    assert sorted(p.name for p in (tmp_path / "runs" / "repro").iterdir()) == [LEASE_FILE]
    assert ray_starts == []

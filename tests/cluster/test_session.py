"""Joining Ray (cbd_ray.session).

- A local Ray's processes know its address: a task and a detached actor see ``RAY_ADDRESS``
  set to this Ray's own GCS (Ray Train's placement-group cleaner, a detached actor, would
  otherwise ask whichever Ray was started last on the machine), and the starting process's
  environment is left as it was.
- A port taken by another process between choosing it and the GCS binding it is tried again,
  at most ``tries`` times; any other failed start is raised at once.
- Ray Train's placement-group cleaner gets shorter timeouts (bench/train_shutdown.py measures
  what they save) only when its constructor is the one measured.
"""
from __future__ import annotations

import os

import pytest

from cbd_ray import session


@pytest.fixture
def cleaner_defaults():
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback as cb

    saved = cb.__init__.__defaults__
    yield cb
    cb.__init__.__defaults__ = saved


def test_shorter_timeouts_reach_every_new_callback(cleaner_defaults):
    assert session.shorten_train_shutdown({"get_actor_timeout_s": 1.5, "stop_timeout": 2.5})
    made = cleaner_defaults()
    assert (made._get_actor_timeout_s, made._stop_timeout, made._check_interval_s) == (1.5, 2.5, 1.0)
    assert session.shorten_train_shutdown()  # the project's values
    made = cleaner_defaults()
    assert (made._get_actor_timeout_s, made._stop_timeout) == tuple(session.PG_CLEANER_TIMEOUTS.values())


def test_a_changed_ray_keeps_its_own_defaults(cleaner_defaults, monkeypatch):
    def other(self, check_interval_s=1.0, timeout_s=10):  # a future signature
        pass

    monkeypatch.setattr(cleaner_defaults, "__init__", other)
    assert not session.shorten_train_shutdown()
    assert other.__defaults__ == (1.0, 10)


def test_a_local_rays_processes_know_its_own_address(ray_clean):
    ray = ray_clean
    own = ray.get_runtime_context().gcs_address

    @ray.remote(num_cpus=0)
    def seen() -> str | None:
        return os.environ.get("RAY_ADDRESS")

    @ray.remote(num_cpus=0)
    class Detached:
        def seen(self) -> str | None:
            return os.environ.get("RAY_ADDRESS")

    actor = Detached.options(lifetime="detached", name="cbd-address-probe").remote()
    try:
        assert ray.get(seen.remote()) == own
        assert ray.get(actor.seen.remote()) == own
    finally:
        ray.kill(actor)
    assert "RAY_GCS_SERVER_PORT" not in os.environ  # the port was Ray's to take, not this process's


def test_a_port_taken_before_ray_binds_it_is_tried_again(monkeypatch):
    import ray

    calls: list[tuple[int, dict]] = []
    shutdowns: list[int] = []

    def init(port: int, env_vars: dict, options: dict) -> str:
        calls.append((port, options))
        if len(calls) < 3:
            raise RuntimeError("the GCS could not bind its port")
        return f"192.0.2.1:{port}"

    monkeypatch.setattr(session, "_init_on", init)
    monkeypatch.setattr(session, "_port_free", lambda port: False)  # someone else took each one
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    assert session.start_local_ray(num_cpus=1) == f"192.0.2.1:{calls[-1][0]}"
    assert [o for _, o in calls] == [{"num_cpus": 1}] * 3 and len(shutdowns) == 2  # each failed start shut down
    calls.clear()
    with pytest.raises(RuntimeError, match="could not bind"):
        session.start_local_ray(tries=2)  # the last failure is the caller's
    assert len(calls) == 2
    calls.clear()
    monkeypatch.setattr(session, "_port_free", lambda port: True)  # the port is free: not the race
    with pytest.raises(RuntimeError, match="could not bind"):
        session.start_local_ray()
    assert len(calls) == 1

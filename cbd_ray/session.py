"""Joining Ray: one rule for every job and command.

``RAY_ADDRESS`` set (``ray job submit`` sets it; ``auto`` for a head started on this
machine): join that cluster, whose runtime env already reaches every worker. Otherwise start
a local Ray in this process — never attach to a stray cluster found on the machine by
accident (a stale ``/tmp/ray/ray_current_cluster`` would make ``ray.init()`` join it).

A local Ray's own processes are told its address too (``start_local_ray``): Ray Train's
placement-group cleaner asks the state API about its controller, and without ``RAY_ADDRESS``
the state API picks the cluster last started on the machine. With a second Ray there (another
job, a ``ray start`` head) it would ask the wrong cluster, find no controller and remove the
placement group of a run still training.
"""
from __future__ import annotations

import os

#: environment prefixes a fresh local Ray passes to its workers (offline hub, Ray settings,
#: the console's verbosity: cbd_ray.console)
_FORWARD = ("RAY_", "HF_", "TOKENIZERS_", "TORCH_EXTENSIONS", "TRANSFORMERS_VERBOSITY", "CBD_VERBOSE")


def connect_ray(num_cpus: int | None = None) -> bool:
    """Connect to Ray as described above. True when this call connected (the caller shuts it
    down when done), False when Ray was already initialised. The workers' output then goes
    through the project's console (cbd_ray.console: quiet unless -v)."""
    import ray

    from cbd_ray import console

    if ray.is_initialized():
        return False
    console.unroute_worker_output()  # a quiet run's printer left over in this process
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **console.ray_init_options())
    else:
        env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARD) and k not in _OWN}
        start_local_ray(num_cpus=num_cpus, include_dashboard=False, env_vars=env, **console.ray_init_options())
    console.route_worker_output()
    return True


#: what start_local_ray sets while the local Ray starts; never forwarded as they were before
_OWN = ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")


def start_local_ray(env_vars: dict[str, str] | None = None, tries: int = 3, **options) -> str:
    """``ray.init(address="local", ...)`` whose every process (raylet, workers, detached
    actors) inherits ``RAY_ADDRESS`` set to this Ray's own GCS: its port is chosen here and
    given to Ray through ``RAY_GCS_SERVER_PORT``. This process's environment is left as it
    was. Returns the GCS address. A start that fails because another process took the port
    between choosing and binding is tried again; any other failure is the caller's."""
    import ray

    for attempt in range(1, tries + 1):
        port = _free_port()
        try:
            return _init_on(port, env_vars or {}, options)
        except Exception:  # noqa: BLE001 - Ray says little about why its GCS did not start
            if attempt == tries or _port_free(port):
                raise
            ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _init_on(port: int, env_vars: dict[str, str], options: dict) -> str:
    """ray.init with ``RAY_ADDRESS`` and ``RAY_GCS_SERVER_PORT`` in this process's environment
    while Ray starts its processes (they inherit it), restored afterwards."""
    import ray

    address = f"{ray.util.get_node_ip_address()}:{port}"
    saved = {k: os.environ.get(k) for k in _OWN}
    os.environ.update(RAY_ADDRESS=address, RAY_GCS_SERVER_PORT=str(port))
    try:
        ray.init(address="local", runtime_env={"env_vars": env_vars}, **options)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return address


#: Ray Train 2.60 ends every ``fit()`` by stopping its detached PlacementGroupCleaner, whose
#: monitor thread sits in a state-API call (``get_actor``, 10 s timeout) that does not return
#: on stop; the controller waits ``2·1 s + 10 s`` for it. Measured on a 2-core CPU: fit()
#: returned 14-16 s after its last report, 3-5 s with the values below (bench/train_shutdown.py).
#: Safe: the cleaner only removes a placement group once it sees the controller dead, and a
#: graceful shutdown has already removed it; a state-API timeout just means "ask again".
PG_CLEANER_TIMEOUTS = {"get_actor_timeout_s": 1.0, "stop_timeout": 1.0}


def shorten_train_shutdown(timeouts: dict[str, float] | None = None) -> bool:
    """Give Ray Train's PlacementGroupCleanerCallback shorter default timeouts (see
    ``PG_CLEANER_TIMEOUTS``). Only when its ``__init__`` still has exactly the parameters
    this was measured on; otherwise Ray's own defaults stay. True when applied."""
    import inspect
    import logging

    log = logging.getLogger(__name__)
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback as cb
    except ImportError:
        log.debug("Ray Train has no PlacementGroupCleanerCallback: nothing to shorten")
        return False
    params = list(inspect.signature(cb.__init__).parameters)
    if params != ["self", "check_interval_s", "get_actor_timeout_s", "stop_timeout"] or len(cb.__init__.__defaults__ or ()) != 3:
        log.debug("PlacementGroupCleanerCallback(%s) is not the one measured: Ray's defaults stay", params)
        return False
    want = {**PG_CLEANER_TIMEOUTS, **(timeouts or {})}
    check = cb.__init__.__defaults__[0]
    cb.__init__.__defaults__ = (check, want["get_actor_timeout_s"], want["stop_timeout"])
    return True

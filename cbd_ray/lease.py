"""One driver per run directory: a lease file with a heartbeat, on any storage.

Two drivers on one run directory (a double submit, or a retried job whose first driver still
lives) race: both start Ray Train runs under one storage path and one fails with Ray Train's
misleading "check that all nodes have read/write access", or a remote run's local copy is
wiped under the other. So a driver first takes ``<run dir>/.lease.json``, holding its host,
pid, a random token, when it started and when it last beat::

    with RunLease(run_uri, timeout_s=120):
        ...  # the whole run

- A lease that is not ours and whose heartbeat is younger than the timeout refuses the new
  driver within seconds, with one line naming the holder and what to do (:class:`LeaseHeld`).
- A lease whose heartbeat is older than the timeout is taken over, with a warning naming
  whose lease it was and how stale. So is one whose holder ran on this host, in this pid
  namespace, and is gone (a killed driver need not be waited out).
- A daemon thread rewrites the heartbeat every ``timeout_s / 4``; finding another token
  there, it logs an error and stops: ``lease.lost`` turns True and :meth:`RunLease.check`
  raises :class:`LeaseLost`, so the driver stops before it writes over the new holder's work.
- On exit the file is removed, only if it is still ours.

How safe it is, honestly: object stores (S3, GCS) have no atomic create-if-absent that
pyarrow.fs exposes, so acquiring is read, write, wait ``settle_s``, read back. Two drivers
that both read "no lease" both write; the last write wins, and each reads back after the
settle delay: the loser sees the winner's token and refuses. The race is lost only when one
driver's write lands more than ``settle_s`` after the other's read-back, i.e. a storage write
slower than the delay; the delay narrows the window, it does not close it. Local files are
written atomically (rename), so a reader never sees half a lease. Staleness compares the
holder's wall-clock heartbeat with ours: clocks of different hosts must agree to well within
the timeout (NTP does; the default 120 s leaves a wide margin).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Iterator

from cbd_ray.errors import CBDError
from cbd_ray.storage import (StorageError, atomic_write_bytes, filesystem, is_remote, local_path, redact,
                             uri_exists, uri_join, write_bytes)

logger = logging.getLogger(__name__)

#: the lease's name inside a run directory (hidden: never a stage output, never uploaded)
LEASE_FILE = ".lease.json"
#: seconds without a heartbeat before a lease is taken over (``run.lease_timeout_s``)
DEFAULT_TIMEOUT_S = 120.0


class LeaseHeld(CBDError):
    """Another live driver holds the run directory."""


class LeaseLost(StorageError):
    """Another driver took the run directory over while this one ran."""


def lease_uri(run_uri: str) -> str:
    """Where the lease of the run directory ``run_uri`` lives."""
    return uri_join(run_uri, LEASE_FILE)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux), so a pid is only judged dead where it means the
    same process: two containers may share a host name but not a pid namespace."""
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return None


def read_lease(uri: str) -> dict[str, Any] | None:
    """The lease at ``uri``; None when there is none. A file that is not a lease (not JSON,
    no token) reads as ``{}``, which counts as stale. Storage errors other than "not found"
    raise StorageError: a driver never assumes "free" over a lease it could not read."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            raw = f.read()
    except Exception as exc:  # noqa: BLE001 - "not found" differs by backend: ask again
        if not uri_exists(uri):
            return None
        raise StorageError(f"lease {redact(uri)} cannot be read: {exc}") from exc
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) and data.get("token") else {}


def _write(uri: str, data: dict[str, Any]) -> None:
    raw = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    if is_remote(uri):
        write_bytes(uri, raw)  # one PUT: readers see the old object or the new one
    else:
        atomic_write_bytes(local_path(uri), raw)


def _remove(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except Exception as exc:  # noqa: BLE001
        if uri_exists(uri):
            raise StorageError(f"lease {redact(uri)} cannot be removed: {exc}") from exc


def describe(lease: dict[str, Any], now: float | None = None) -> str:
    """The holder as messages name it: host, pid, start time, heartbeat age."""
    now = time.time() if now is None else now
    h = lease.get("holder") or {}
    beat = lease.get("heartbeat")
    age = f"{max(0.0, now - float(beat)):.0f} s ago" if isinstance(beat, (int, float)) else "unknown"
    return (f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, started at {lease.get('started_at', '?')}, "
            f"last heartbeat {age}")


class RunLease:
    """The lease of one run directory (a local path or a pyarrow.fs URI); a context manager.

    ``timeout_s``: seconds without a heartbeat before another driver takes the lease over
    (a holder's own, larger timeout is respected too); ``heartbeat_s``: how often the
    holder beats (default ``timeout_s / 4``, so three beats may be missed); ``settle_s``: the
    wait between writing and reading back (default 0.5 s local, 2 s remote; see the module
    docstring). Not re-entrant: a second RunLease on the same directory refuses even in the
    same process (use :func:`hold_run_dir` for nested holders).
    """

    def __init__(self, run_uri: str, timeout_s: float = DEFAULT_TIMEOUT_S, heartbeat_s: float | None = None,
                 settle_s: float | None = None) -> None:
        if not timeout_s > 0:
            raise CBDError(f"lease timeout {timeout_s} must be > 0 seconds")
        self.run_uri = str(run_uri)
        self.uri = lease_uri(self.run_uri)
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s else self.timeout_s / 4
        self.settle_s = float(settle_s) if settle_s is not None else (2.0 if is_remote(self.run_uri) else 0.5)
        self.token = uuid.uuid4().hex
        self.lost = False
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record: dict[str, Any] = {}

    # ------------------------------------------------------------------ acquire
    def acquire(self) -> "RunLease":
        """Take the lease or raise LeaseHeld naming the live holder (see the class docstring)."""
        self._judge(read_lease(self.uri))
        now = time.time()
        self._record = {"token": self.token, "run": redact(self.run_uri), "timeout_s": self.timeout_s,
                        "holder": {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace()},
                        "started": now, "started_at": _iso(now), "heartbeat": now, "heartbeat_at": _iso(now)}
        _write(self.uri, self._record)
        time.sleep(self.settle_s)  # let a racing driver's write land before we read back
        back = read_lease(self.uri)
        if not back or back.get("token") != self.token:
            if back:
                raise LeaseHeld(self._held_message(back))
            raise LeaseHeld(f"run directory {redact(self.run_uri)}: the lease just written is gone "
                            f"({redact(self.uri)}); another driver is starting on it; try again later")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat-{self.token[:8]}", daemon=True)
        self._thread.start()
        logger.info("run directory %s: lease taken (token %s, heartbeat every %.0f s)",
                    redact(self.run_uri), self.token[:8], self.heartbeat_s)
        return self

    def _judge(self, lease: dict[str, Any] | None) -> None:
        """Return when the lease may be taken (none, ours, stale or its holder gone); raise
        LeaseHeld when a live driver holds it."""
        if lease is None or lease.get("token") == self.token:
            return
        if not lease:
            logger.warning("run directory %s: %s is not a lease this version wrote; taking it over",
                           redact(self.run_uri), redact(self.uri))
            return
        age = self._age(lease)
        limit = self._limit(lease)
        if age >= limit:
            logger.warning("run directory %s: taking over the stale lease of %s (no heartbeat for %.0f s, "
                           "more than the %.0f s timeout)", redact(self.run_uri), describe(lease), age, limit)
            return
        if _holder_gone(lease):
            logger.warning("run directory %s: taking over the lease of %s: that process no longer exists "
                           "on this host", redact(self.run_uri), describe(lease))
            return
        raise LeaseHeld(self._held_message(lease))

    def _limit(self, lease: dict[str, Any]) -> float:
        """The larger of our timeout and the holder's: a holder beats every timeout/4 of its own."""
        theirs = lease.get("timeout_s")
        return max(self.timeout_s, float(theirs)) if isinstance(theirs, (int, float)) else self.timeout_s

    @staticmethod
    def _age(lease: dict[str, Any]) -> float:
        beat = lease.get("heartbeat")
        return time.time() - float(beat) if isinstance(beat, (int, float)) else float("inf")

    def _held_message(self, lease: dict[str, Any]) -> str:
        limit = self._limit(lease)
        left = max(0.0, limit - max(0.0, self._age(lease)))
        return (f"run directory {redact(self.run_uri)} is in use by another driver ({describe(lease)}); "
                f"wait for it to finish or stop that driver; if it is gone, its lease is taken over once "
                f"{limit:.0f} s pass without a heartbeat (in about {left:.0f} s; run.lease_timeout_s)")

    # ------------------------------------------------------------------ heartbeat
    def _beat(self) -> None:
        """Refresh the heartbeat until stopped; stop for good when another token is found."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except OSError as exc:  # storage or disk, often transient: the next beat tries again
                logger.warning("run directory %s: heartbeat failed: %s", redact(self.run_uri), exc)
            if self.lost:
                return

    def beat(self) -> bool:
        """One heartbeat: True when written; False (and ``lost`` set) when the lease is no
        longer ours, which is logged as an error naming the new holder."""
        current = read_lease(self.uri)
        if not current or current.get("token") != self.token:
            self.lost = True
            who = describe(current) if current else "nobody (the lease file is gone)"
            logger.error("run directory %s: lease lost: now held by %s; this driver stops heartbeating",
                         redact(self.run_uri), who)
            return False
        now = time.time()
        self._record.update(heartbeat=now, heartbeat_at=_iso(now))
        _write(self.uri, self._record)
        return True

    def check(self) -> None:
        """Raise LeaseLost when another driver took the run directory over (call between
        stages, before writing shared files)."""
        if self.lost:
            raise LeaseLost(f"run directory {redact(self.run_uri)}: another driver took over its lease while this "
                            f"run was going on; this driver stops (see the log for the new holder)")

    # ------------------------------------------------------------------ release
    def release(self) -> None:
        """Stop heartbeating and remove the lease if it is still ours (never another's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if not self.held:
            return
        self.held = False
        try:
            current = read_lease(self.uri)
            if current and current.get("token") == self.token:
                _remove(self.uri)
                logger.info("run directory %s: lease released", redact(self.run_uri))
            else:
                logger.warning("run directory %s: lease not ours any more at exit; left in place",
                               redact(self.run_uri))
        except OSError as exc:
            logger.warning("run directory %s: lease could not be released (%s); it goes stale in %.0f s",
                           redact(self.run_uri), exc, self.timeout_s)

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _holder_gone(lease: dict[str, Any]) -> bool:
    """True only when the holder ran on this host, in this pid namespace, and its pid is dead."""
    h = lease.get("holder") or {}
    if h.get("host") != socket.gethostname() or not h.get("pidns") or h.get("pidns") != _pid_namespace():
        return False
    pid = h.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # no permission: someone's live process
        return False
    return False


_HELD: dict[str, RunLease] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def hold_run_dir(run_uri: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 settle_s: float | None = None) -> Iterator[RunLease]:
    """Hold the run directory's lease for the block. Re-entrant within one process: a job that
    holds it (``cbd tune``) and calls another that takes it (``run_chain``) shares one lease."""
    key = lease_uri(str(run_uri))
    with _HELD_LOCK:
        outer = _HELD.get(key)
    if outer is not None and outer.held:
        yield outer
        return
    lease = RunLease(str(run_uri), timeout_s=timeout_s, settle_s=settle_s).acquire()
    with _HELD_LOCK:
        _HELD[key] = lease
    try:
        yield lease
    finally:
        with _HELD_LOCK:
            _HELD.pop(key, None)
        lease.release()

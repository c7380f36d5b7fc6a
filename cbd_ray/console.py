"""What reaches the terminal: the project's progress, one line per stage, and errors.

Quiet is the default (``cbd ...`` without ``-v``; ``-q`` keeps only warnings and errors):

* **Ray workers.** Ray forwards every line a worker prints to the driver. :class:`WorkerLines`
  takes the place of Ray's printer (:func:`route_worker_output`): of the workers' lines only
  the project's own progress (:data:`OWN_LINE`: ``[distill] step ...``, ``pretrain: ...``)
  reaches the console, as log lines of ``cbd_ray.workers``, and Ray's own notices (the
  raylet's: a worker killed, memory); Ray Train's controller, DeepSpeed, transformers, Ray
  Data and tqdm lines do not. Every line goes to the run's log file (:func:`log_file`).
* **Libraries in the driver.** Ray's logger at WARNING (``ray.init(logging_level=...)``),
  Ray Data's console handler at WARNING (:func:`quiet_ray_data`),
  transformers at ERROR without progress bars (``TRANSFORMERS_VERBOSITY``,
  ``HF_HUB_DISABLE_PROGRESS_BARS``, read when it is imported), DeepSpeed's logger at ERROR.

``-v`` changes none of it: every line as Ray and the libraries print it (and, in the run's
log file, the workers' lines too). Errors are not this module's: a failing stage or bad
input prints its one line through the error boundary (:func:`cbd_ray.errors.run_main`),
and a worker's traceback reaches the driver as the exception it raised.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

#: "1" when -v was given (set by :func:`configure`; local Ray workers inherit it)
VERBOSE_ENV = "CBD_VERBOSE"

#: the project's own worker lines (train.py's progress, stages.models.pretrain_lm,
#: finetune, the bridge, stages.evaluate), optionally after reproduce's "run/method: "
OWN_LINE = re.compile(r"^(?:[\w.-]+/[\w.-]+: )?(?:\[(?:distill|evaluate)\] |pretrain: |finetune |bridge: )")

#: where the workers' lines the console shows are logged
WORKER_LOGGER = "cbd_ray.workers"

#: a run's log file, relative to its run directory
LOG_FILE = "logs/run.log"

#: environment read by the driver's libraries when they are imported, on a quiet console
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

#: the name of the printer in Ray's dispatcher of worker output
HANDLER_NAME = "cbd_console"

#: marks the lines of ray.experimental.tqdm_ray (a bar's state, not text)
_TQDM_MAGIC = "__ray_tqdm_magic_token__"

_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
_files: list[logging.Handler] = []
_set_env: dict[str, str] = {}


def verbose() -> bool:
    """True when -v was given: libraries and Ray workers print as they do by default."""
    return os.environ.get(VERBOSE_ENV) == "1"


def _at_least_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or verbose()


def configure(verbosity: int) -> None:
    """Set the console for -q (-1), none (0) or -v (1); called once by the CLI before any
    library is imported (the environment it sets is read at import)."""
    os.environ[VERBOSE_ENV] = "1" if verbosity > 0 else "0"
    if verbosity > 0:
        for k, v in list(_set_env.items()):  # an earlier quiet call in this process
            if os.environ.get(k) == v:
                del os.environ[k]
            del _set_env[k]
        return
    for k, v in QUIET_ENV.items():
        if k not in os.environ:
            os.environ[k] = _set_env[k] = v
    # DeepSpeed's logger ("DeepSpeed", its own handler, no propagation) warns "Setting
    # accelerator to CPU" on every import without a GPU; a logger filter survives its setup
    ds = logging.getLogger("DeepSpeed")
    if _at_least_error not in ds.filters:
        ds.addFilter(_at_least_error)


def ray_init_options() -> dict[str, Any]:
    """Keyword arguments of ``ray.init`` for this console: Ray's own driver log at WARNING
    when quiet ("Started a local Ray instance" and the like)."""
    return {} if verbose() else {"logging_level": logging.WARNING}


def quiet_ray_data() -> None:
    """Ray Data's progress and execution lines (INFO) off the quiet console; its log file in
    the Ray session keeps them. Not ``DataContext.enable_progress_bars = False``: Ray Data
    then warns on the console that progress bars are off. Call before a Ray Data execution;
    idempotent."""
    if verbose():
        return
    import ray.data  # noqa: F401 - configures the "ray.data" logger on import

    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, logging.StreamHandler):  # its console handler (the file one is not)
            h.setLevel(logging.WARNING)


class WorkerLines:
    """A handler of Ray's worker output (one dict per batch: ``lines``, ``pid``, ``is_err``,
    ``actor_name``/``task_name``): every line to the open log files, and on a quiet console
    the project's own lines (and the raylet's) to the ``cbd_ray.workers`` logger."""

    def __init__(self, console: bool = True) -> None:
        self.console = console
        self.log = logging.getLogger(WORKER_LOGGER)

    def __call__(self, data: dict[str, Any]) -> None:
        pid = data.get("pid")
        system = pid in ("raylet", "autoscaler")
        name = data.get("actor_name") or data.get("task_name")
        who = pid if system else f"{name} pid={pid}" if name else f"pid={pid}"
        lines = list(data.get("lines") or [])
        if pid == "autoscaler":  # its status every 5 s: only the events (as Ray's printer does)
            lines = _autoscaler_events(lines)
        lines = [ln for ln in lines if _TQDM_MAGIC not in ln]  # ray.experimental.tqdm_ray's state
        stream = "ray.stderr" if data.get("is_err") else "ray.stdout"
        for h in list(_files):
            for line in lines:
                h.handle(logging.makeLogRecord({"name": stream, "levelno": logging.INFO, "levelname": "INFO",
                                                "msg": f"({who}) {line}"}))
        if not self.console:
            return
        for line in lines:
            if system:
                self.log.warning("(%s) %s", who, line)
            elif OWN_LINE.match(line):
                self.log.info("%s", line)


def _autoscaler_events(lines: list[str]) -> list[str]:
    """The autoscaler's events among its lines (Ray's own filter; none without it)."""
    worker = sys.modules.get("ray._private.worker")
    try:
        return list(worker.filter_autoscaler_events(lines)) if worker is not None else []
    except Exception:  # noqa: BLE001 - moved or needs a cluster: its status is not worth a crash
        return []


def _dispatcher() -> Any:
    """Ray's dispatcher of worker output (None when this Ray has none)."""
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as d
    except ImportError:
        return None
    return d if hasattr(d, "add_handler") and hasattr(d, "remove_handler") else None


def route_worker_output(dispatcher: Any = None) -> bool:
    """After ``ray.init``: Ray's worker output through :class:`WorkerLines` — instead of
    Ray's printer on a quiet console, beside it with -v (then it only files the lines).
    False when this Ray has no dispatcher to hook (its printer stays)."""
    d = dispatcher or _dispatcher()
    if d is None:
        logging.getLogger(__name__).debug("Ray has no worker-output dispatcher: its own printer stays")
        return False
    d.remove_handler(HANDLER_NAME)
    if not verbose():
        d.remove_handler("ray_print_logs")
    d.add_handler(HANDLER_NAME, WorkerLines(console=not verbose()))
    return True


def unroute_worker_output(dispatcher: Any = None) -> None:
    """Remove :class:`WorkerLines` from Ray's dispatcher (e.g. before another ``ray.init``)."""
    d = dispatcher or _dispatcher()
    if d is not None:
        d.remove_handler(HANDLER_NAME)


@contextmanager
def log_file(path: str | os.PathLike) -> Iterator[Path]:
    """Append this process's log lines (the ``cbd_ray`` loggers) and every line of Ray's
    workers to ``path`` while the block runs; the console says where, once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_FORMAT)
    handler.addFilter(lambda r: r.name != WORKER_LOGGER)  # a worker's line is filed as it came
    root = logging.getLogger("cbd_ray")
    _files.append(handler)
    root.addHandler(handler)
    shown = "" if verbose() else "; -v shows them here"
    logging.getLogger(__name__).info("this run's log, every Ray worker line included: %s%s", path, shown)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        _files.remove(handler)
        handler.close()

"""Error types shared by the project. All derive from ValueError so callers and the CLI
can treat bad input uniformly; the message always names the bad value and what is allowed."""
from __future__ import annotations

from typing import Callable


class CBDError(ValueError):
    """Bad input detected before any expensive work."""


class ConfigError(CBDError):
    """A config value is unknown or impossible; the message names its dotted path."""


class CheckpointError(CBDError):
    """A checkpoint directory is missing files, corrupt or of an unsupported kind."""


class IncompatibleModelsError(CBDError):
    """Two models cannot be combined (different families or vocabularies)."""


# ------------------------------------------------------------------------ the error boundary

#: exit codes of every entry point
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

#: OSErrors that mean the user named a bad path (the others, e.g. a full disk, are failures)
_BAD_PATH = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a multi-line message's lines joined by '; '); a
    Ray task error is reduced to the error its task raised."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and type(exc).__name__.startswith("RayTaskError"):
        exc = cause
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    parts = [s.strip() for s in text.splitlines() if s.strip()]
    if not parts:
        return type(exc).__name__
    line = parts[0]
    for i, part in enumerate(parts[1:]):  # "x is invalid:" then one item per line
        line += (" " if parts[i].endswith(":") else "; ") + part
    return line


def _known(exc: BaseException) -> int | None:
    """The exit code for an expected error, None for a bug (which keeps its traceback)."""
    import sys

    pipeline = sys.modules.get("cbd_ray.pipeline")
    failed = getattr(pipeline, "StageFailed", None)
    if failed is not None and isinstance(exc, failed):
        return EXIT_FAILED
    yaml = sys.modules.get("yaml")
    if isinstance(exc, (ValueError, _BAD_PATH)) or (yaml is not None and isinstance(exc, yaml.YAMLError)):
        return EXIT_BAD_INPUT
    if isinstance(exc, OSError):
        return EXIT_FAILED
    return None


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None, prog: str = "cbd") -> int:
    """Run an entry point's ``main(argv) -> int`` inside the project's one error boundary.

    Bad input (CBDError and every ValueError, a bad path, invalid YAML) prints one line
    ``PROG: error: ...`` on stderr and returns 2; a failed stage (pipeline.StageFailed) or an
    OSError such as a full disk returns 1 with one line naming the run's manifest; Ctrl-C
    returns 130 with one line. Anything else is a bug: it propagates with its traceback.
    """
    import sys

    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - sorted into known errors and bugs below
        code = _known(exc)
        if code is None:
            raise
        line = one_line(exc)
        if code == EXIT_FAILED and type(exc).__name__ == "StageFailed":
            where = getattr(exc, "manifest", None)
            line += f" (the record: {where})" if where else " (the run directory's manifest.json records it)"
        print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
        return code

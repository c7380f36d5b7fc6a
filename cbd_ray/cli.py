"""The `cbd` command.

Each subcommand lives in a module of :mod:`cbd_ray.commands` that exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen subcommand's module is
imported, and those modules import nothing heavy at the top, so every ``--help`` (and
``cbd validate``) runs without torch, Ray or transformers. The ``jobs/`` scripts for
``ray job submit`` are thin wrappers over :func:`main`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "build-chain": ("cbd_ray.commands.build_chain", "build a chain, interpolate its grid, evaluate, report (the main job)"),
    "tune": ("cbd_ray.commands.tune", "Ray Tune searches over a chain: best α per target and chain density"),
    "grid": ("cbd_ray.commands.grid", "interpolate a grid of targets between two anchors on Ray actors"),
    "reproduce": ("cbd_ray.commands.reproduce", "the paper's comparison: CBD against its baselines"),
    "interpolate": ("cbd_ray.commands.interpolate", "make one target model between two anchors"),
    "distill": ("cbd_ray.commands.distill", "run one chain step (a distillation) on Ray Train"),
    "pseudo-label": ("cbd_ray.commands.pseudo_label", "teacher answers to instruction prompts (SeqKD) on Ray Data"),
    "evaluate": ("cbd_ray.commands.evaluate", "evaluate a model on tasks, one JSON line per task"),
    "evaluate-many": ("cbd_ray.commands.evaluate_many", "evaluate many models on Ray, a table per model"),
    "validate": ("cbd_ray.commands.validate", "check any shipped kind of config without running anything"),
    "report": ("cbd_ray.commands.report", "regenerate the report of a run directory"),
    "export": ("cbd_ray.commands.export", "export a model to ONNX or GGUF (llama.cpp), each checked"),
    "push": ("cbd_ray.commands.push", "upload a run's models to the Hugging Face Hub with their cards"),
    "configs": ("cbd_ray.commands.configs", "list the built-in configs (use them as --config NAME)"),
}

#: -q / (none) / -v: the level of the project's own loggers; other libraries log one level higher
_LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


class CLIError(ValueError):
    """Bad input at the command line: printed on stderr, exit code 2."""


def version() -> str:
    """The installed distribution's version (the package's own when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("cbd-ray")
    except PackageNotFoundError:
        from cbd_ray import __version__

        return __version__


def _common() -> argparse.ArgumentParser:
    """Flags every subcommand takes."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=0,
                   help="warnings and errors only")
    g.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                   help="everything: every Ray worker line, the libraries' logs and progress bars, "
                        "every training step, debug messages")
    return common


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``only`` names the one subcommand whose arguments are added (None: all)."""
    parser = argparse.ArgumentParser(prog="cbd", description="Chain-based Distillation on Ray")
    parser.add_argument("--version", action="version", version=f"cbd-ray {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common()
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if only is None or only == name:
            importlib.import_module(module).add_arguments(p)
    return parser


class _StderrHandler(logging.Handler):
    """Log lines on whatever sys.stderr is at the time (stdout carries the results)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never take the command down
            self.handleError(record)


def setup_logging(verbosity: int) -> None:
    """Route the ``cbd_ray`` loggers to stderr at the level of -q/-v, and quiet the libraries
    and Ray workers unless -v (cbd_ray.console); idempotent."""
    from cbd_ray import console

    console.configure(verbosity)
    log = logging.getLogger("cbd_ray")
    for h in [h for h in log.handlers if isinstance(h, _StderrHandler)]:
        log.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(_LEVELS[verbosity])
    log.propagate = False


def main(argv: list[str] | None = None, **hooks: Any) -> int:
    """Run one subcommand inside the project's error boundary (cbd_ray.errors.run_main);
    returns its exit code (0 ok, 1 a stage failed, 2 bad input: one line on stderr).

    ``hooks`` become attributes of the parsed arguments (e.g. build-chain's ``after_stage``,
    used by tests to stop a run between stages).
    """
    from cbd_ray.errors import run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    prog = f"cbd {chosen}" if chosen in COMMANDS else "cbd"
    return run_main(lambda a: _main(a or [], hooks), argv, prog=prog)


def _main(argv: list[str], hooks: dict[str, Any]) -> int:
    # Import only the chosen subcommand's module (help for all lists names only).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=chosen or "")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    vars(args).update(hooks, argv=argv)
    setup_logging(args.verbosity)
    # Ray Train's print patch would repeat every worker line under `ray job submit`.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


def job_main(command: str, argv: list[str] | None = None, **hooks: Any) -> int:
    """Entry of a ``jobs/*.py`` wrapper: ``cbd COMMAND`` with the script's arguments."""
    return main([command, *(sys.argv[1:] if argv is None else argv)], **hooks)


if __name__ == "__main__":
    sys.exit(main())

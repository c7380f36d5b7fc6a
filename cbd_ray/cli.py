"""The `cbd` command.

Each subcommand lives in the module that owns the concept and exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so that
``cbd --help`` and ``cbd validate`` stay fast (no torch or Ray import until needed).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "interpolate": ("cbd_ray.commands.interpolate", "make one target model between two anchors"),
    "distill": ("cbd_ray.commands.distill", "run one chain step (a distillation) on Ray Train"),
    "evaluate": ("cbd_ray.commands.evaluate", "evaluate a model on tasks, one JSON line per task"),
    "validate": ("cbd_ray.commands.validate", "check a chain config without running anything"),
    "report": ("cbd_ray.commands.report", "regenerate the report of a run directory"),
}


class CLIError(ValueError):
    """Bad input at the command line: printed on stderr, exit code 2."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbd", description="Chain-based Distillation on Ray")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `cbd` command inside the project's error boundary (cbd_ray.errors.run_main):
    bad input is one line on stderr and exit 2, a failed stage exit 1."""
    from cbd_ray.errors import run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    return run_main(_main, argv, prog=f"cbd {chosen}" if chosen else "cbd")


def _main(argv: list[str]) -> int:
    # Import only the chosen subcommand's module (help for all lists names only).
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=chosen or "")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

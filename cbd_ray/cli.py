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


class CLIError(Exception):
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
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the chosen subcommand's module (help for all lists names only).
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=chosen or "")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"cbd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

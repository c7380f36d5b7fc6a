"""Subcommands of `cbd`: each module has add_arguments(parser) and run(args)."""

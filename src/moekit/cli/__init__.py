"""The ``moekit`` command: one parser module per group of subcommands (see ``main``)."""

from moekit.cli.main import build_parser, main

__all__ = ["build_parser", "main"]

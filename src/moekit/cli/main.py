"""The ``moekit`` command.

Each subcommand is one ``cmd_*`` function taking the parsed arguments and returning the exit
status, registered by one ``add_*`` function that builds its parser (with example commands in
the ``--help`` epilog), in one module per group of subcommands. A subcommand's work is
imported inside its ``cmd_*`` function, so ``moekit --help`` imports no torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moekit import __version__
from moekit.cli.bench import add_bench
from moekit.cli.common import help_formatter, print_help
from moekit.cli.compare import add_compare
from moekit.cli.inspect import add_inspect
from moekit.cli.interop import add_interop
from moekit.cli.multitask import add_multitask
from moekit.cli.train import add_sample, add_train

EPILOG_MAIN = """\
examples:
  moekit bench layer                      time and memory of the MoE layer vs a dense FFN
  moekit bench layer --cases 1,4 --rounds 9
  moekit bench layer --quick --json       a smoke test, figures as JSON on the last line
"""



# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit",
        description="Sparse Mixture-of-Experts layers and models for PyTorch.",
        epilog=EPILOG_MAIN,
        formatter_class=help_formatter,
    )
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.set_defaults(func=lambda args: print_help(parser))
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_train(subparsers)
    add_sample(subparsers)
    add_compare(subparsers)
    add_bench(subparsers)
    add_interop(subparsers)
    add_multitask(subparsers)
    add_inspect(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

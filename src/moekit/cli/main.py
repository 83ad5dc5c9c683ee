"""The ``moekit`` command.

Each subcommand is one ``cmd_*`` function taking the parsed arguments and returning the exit
status, registered by one ``add_*`` function that builds its parser (with example commands in
the ``--help`` epilog), in one module per group of subcommands. A subcommand's work is
imported inside its ``cmd_*`` function; ``moekit train``'s flags are derived from the config
dataclasses.

A subcommand given ``--json`` whose parser asks for it (``add_json_flag(parser, document=True)``)
runs inside ``json_output``: stdout carries exactly one JSON document, everything else goes to
stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moekit import __version__
from moekit.cli.bench import add_bench
from moekit.cli.common import EXIT_USAGE, MoekitParser, help_formatter, json_output
from moekit.cli.compare import add_compare
from moekit.cli.inspect import add_inspect
from moekit.cli.interop import add_interop
from moekit.cli.multitask import add_multitask
from moekit.cli.pack import add_pack
from moekit.cli.trace import add_trace
from moekit.cli.train import add_sample, add_train

EPILOG_MAIN = """\
examples: (one per command)
  moekit train                                    a small MoE on tiny Shakespeare (~5 min on 2 CPU cores)
  moekit sample runs/moe-20260101-120000 --prompt "ROMEO:"
  moekit inspect runs/my --data a.txt,b.py --out runs/my/inspect   what the experts learned: report.html
  moekit compare --quick --out runs/compare       MoE vs dense at equal active compute, with plots
  moekit bench layer --quick                      time and memory of the MoE layer vs a dense FFN
  moekit params mixtral-8x7b --json               total vs active parameters, FLOPs, memory
  moekit export runs/my --hf hf/my                a folder transformers' from_pretrained loads
  moekit import hf/tiny-mixtral --out runs/tiny   a local Mixtral folder as a run directory
  moekit pack runs/my --out stores/my             an expert store: moekit sample stores/my --memory-budget 4GiB
  moekit finetune --from runs/my --data new.txt --out runs/ft --freeze experts
  moekit upcycle runs/dense --out runs/up --experts 8 --top-k 2
  moekit multitask synthetic --out runs/mt        MMoE vs one-gate MoE vs shared-bottom
  moekit trace runs/my --out t.npz                which experts each token used; then: trace simulate t.npz --capacity 4

Every command takes --json (one JSON document on stdout) and --help (its flags and examples).
"""


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = MoekitParser(
        prog="moekit",
        description="Sparse Mixture-of-Experts layers and models for PyTorch.",
        epilog=EPILOG_MAIN,
        formatter_class=help_formatter,
    )
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.set_defaults(func=lambda args: _no_command(parser))
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_train(subparsers)
    add_sample(subparsers)
    add_pack(subparsers)
    add_compare(subparsers)
    add_bench(subparsers)
    add_interop(subparsers)
    add_multitask(subparsers)
    add_inspect(subparsers)
    add_trace(subparsers)
    return parser


def _no_command(parser: argparse.ArgumentParser) -> int:
    """``moekit`` alone: the help on stderr (stdout stays clean for scripts), exit status 2."""
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a bad command line (already reported)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USAGE)
    try:
        with json_output(bool(getattr(args, "json", False) and getattr(args, "json_document", False))):
            return args.func(args)
    except KeyboardInterrupt:
        # Commands that hold work (train, finetune, compare) catch Ctrl-C themselves and save it;
        # one that reaches here was interrupted before or after any work worth saving.
        print("moekit: interrupted; nothing more was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``moekit`` command.

    moekit bench layer                 MoE layer vs its dense equivalent: time and peak memory
    moekit bench layer --quick --json  smoke test; the last line printed is one JSON object

Each subcommand is one ``cmd_*`` function taking the parsed arguments and returning the exit
status, registered by one ``add_*`` function that builds its parser (with example commands in
the ``--help`` epilog). Subcommands that print figures take ``--json``: the figures are then
also printed as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from moekit import __version__

EPILOG_MAIN = """\
examples:
  moekit bench layer                      time and memory of the MoE layer vs a dense FFN
  moekit bench layer --cases 1,4 --rounds 9
  moekit bench layer --quick --json       a smoke test, figures as JSON on the last line
"""

EPILOG_BENCH = """\
examples:
  moekit bench layer
  moekit bench layer --quick --no-hf
"""

EPILOG_BENCH_LAYER = """\
cases (the moekit layer must stay at or under the target ratio):
  1  dropless top-2 SwiGLU, E=8 d=512 f=1024 T=4096         time <= 1.05x dense
  2  fine-grained top-8 SwiGLU, E=64 d=512 f=256 T=4096     time <= 1.20x, faster than hf grouped_mm
  3  fine-grained top-6 SwiGLU, E=64 d=256 f=128 T=8192     time <= 1.20x, faster than hf grouped_mm
  4  Switch top-1 ReLU, capacity 1.25, E=64 d=512 f=1024    time <= 1.15x dense
  5  top-8 SwiGLU, E=64 d=512 f=256 T=16384                 peak memory <= 1.30x dense

The dense equivalent is one expert-sized FFN (same activation, no bias) applied to T*k rows.
Each implementation alternates with it for --rounds rounds of one training step (gradients
reset, forward, backward); the figure is the median of the per-round ratios. Peak memory
counts activations only (no parameters or parameter gradients); the dense equivalent's T*k
input rows and their gradient count. transformers blocks (Mixtral eager / grouped_mm, Switch)
run with the same weights when transformers is installed.

examples:
  moekit bench layer                      all cases, 7 rounds
  moekit bench layer --cases 2,3 --rounds 11
  moekit bench layer --no-hf --json > bench.txt && tail -n 1 bench.txt
  moekit bench layer --quick              tiny sizes, 2 rounds: a smoke test
"""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="also print the figures as one JSON object on the last line"
    )


def _print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, separators=(",", ":")), flush=True)


def _case_list(text: str) -> list[str]:
    keys = [key.strip() for key in text.replace(" ", ",").split(",") if key.strip()]
    if not keys:
        raise argparse.ArgumentTypeError("expected case numbers such as 1,3")
    return keys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


# --------------------------------------------------------------------------------------------
# moekit bench ...
# --------------------------------------------------------------------------------------------


def add_bench(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks: MoE cost as a ratio to the dense equivalent",
        description="Benchmarks. Every figure is a ratio to the dense equivalent.",
        epilog=EPILOG_BENCH,
        formatter_class=_formatter,
    )
    bench.set_defaults(func=lambda args: _print_help(bench))
    bench_sub = bench.add_subparsers(title="benchmarks", metavar="BENCHMARK")
    add_bench_layer(bench_sub)


def add_bench_layer(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "layer",
        help="one MoE layer's fwd+bwd time and peak memory vs the dense equivalent",
        description="Time (fwd+bwd) and peak activation memory of the MoE layer, as ratios to "
        "its dense equivalent, next to transformers' MoE blocks.",
        epilog=EPILOG_BENCH_LAYER,
        formatter_class=_formatter,
    )
    parser.add_argument(
        "--cases", type=_case_list, default=None, metavar="LIST", help="cases to run, e.g. 1,4 (default: all)"
    )
    parser.add_argument(
        "--rounds", type=_positive_int, default=None, metavar="N", help="timed rounds per implementation "
        "(default 7; 2 with --quick)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: a smoke test")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparisons")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for weights and inputs")
    parser.add_argument(
        "--no-malloc-reuse",
        action="store_true",
        help="leave glibc malloc at its defaults (large buffers get fresh pages on every "
        "allocation); by default freed memory is kept for reuse, for every implementation alike",
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    _add_json_flag(parser)
    parser.set_defaults(func=cmd_bench_layer)


def cmd_bench_layer(args: argparse.Namespace) -> int:
    from moekit.bench import bench_layer

    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 7)
    try:
        report = bench_layer(
            case_keys=args.cases,
            rounds=rounds,
            quick=args.quick,
            use_hf=not args.no_hf,
            seed=args.seed,
            malloc_reuse=not args.no_malloc_reuse,
        )
    except ValueError as err:
        print(f"moekit bench layer: error: {err}", file=sys.stderr)
        return 2
    import torch

    print(
        f"moekit bench layer: float32, cpu, {torch.get_num_threads()} threads, {rounds} rounds, "
        f"median of per-round ratios to the dense equivalent"
        + (" (--quick: toy sizes)" if args.quick else "")
    )
    print(report.table())
    if args.json:
        _print_json(report.to_dict())
    return 1 if args.strict and not report.passed else 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit",
        description="Sparse Mixture-of-Experts layers and models for PyTorch.",
        epilog=EPILOG_MAIN,
        formatter_class=_formatter,
    )
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.set_defaults(func=lambda args: _print_help(parser))
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

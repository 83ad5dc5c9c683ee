"""``moekit inspect``: what each expert of a trained MoE LM learned (report.html + routing.json)."""

from __future__ import annotations

import argparse
import sys

from moekit.cli.common import help_formatter, positive_int, print_json

EPILOG_INSPECT = """\
figures (report.html, PNGs, and every number in routing.json):
  expert shares per domain (either / first / second choice) vs 1/E, JS divergence per domain
  text coloured by first-choice expert (--terminal: ANSI colours on stdout)
  consecutive tokens routed to the same expert vs uniform and load-matched random routing
  how well the token id alone predicts its expert, by position
  top tokens per expert by count and by lift; token classes per expert
  load, CV, dead experts, router entropy; capacity drops by position
  routing stability over training (--checkpoints)

examples:
  moekit inspect runs/moe --data shakespeare.txt,code.py,README.md --out runs/moe/inspect
  moekit inspect runs/moe --data a.txt,b.txt --out /tmp/insp --layers 0,3 --terminal
  moekit inspect runs/moe --data a.txt --out /tmp/insp --checkpoints runs/moe-step500,runs/moe-step1000
  moekit inspect runs/moe --data a.txt --out /tmp/insp --json    the summary as JSON on stdout
"""


def _list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block numbers such as 0,3, got {text!r}") from None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def add_inspect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="what each expert learned: routing figures of a trained MoE LM (report.html)",
        description="Run labelled text files (the file name is the domain) through a moekit run's model, "
        "record every MoE layer's routing, and write report.html (self-contained), its PNGs and routing.json.",
        epilog=EPILOG_INSPECT,
        formatter_class=help_formatter,
    )
    parser.add_argument("model", metavar="MODEL", help="moekit run directory (config.json + checkpoint/)")
    parser.add_argument(
        "--data",
        type=_list,
        required=True,
        metavar="FILE[,FILE...]",
        help="UTF-8 text files; each file's name is its domain",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output directory (new, empty, or a previous report)"
    )
    parser.add_argument(
        "--layers",
        type=_int_list,
        default=None,
        metavar="LIST",
        help="blocks for the per-layer pictures (default: first, middle, last MoE block)",
    )
    parser.add_argument(
        "--checkpoints",
        type=_list,
        default=None,
        metavar="DIR[,DIR...]",
        help="earlier run or checkpoint directories of the same model: routing stability",
    )
    parser.add_argument(
        "--tokens-per-domain",
        type=positive_int,
        default=32768,
        metavar="N",
        help="at most N tokens from each file, in evenly spaced windows (default 32768)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        metavar="B",
        help="windows per forward (default: the run's training batch size)",
    )
    parser.add_argument(
        "--sample-windows",
        type=positive_int,
        default=3,
        metavar="N",
        help="windows of each file shown as coloured text (default 3)",
    )
    parser.add_argument("--terminal", action="store_true", help="print the coloured text with ANSI colours to stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--json", action="store_true", help="print the summary of routing.json as the only thing on stdout"
    )
    parser.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.json and args.terminal:
        print("moekit inspect: error: --terminal and --json both write stdout; give one", file=sys.stderr)
        return 2
    from moekit.experiments.inspect import InspectError, run_inspect
    from moekit.experiments.inspect.report import terminal_text

    command = "moekit " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["inspect"] else "moekit inspect"
    try:
        results, routings, probe, tokenizer = run_inspect(
            args.model,
            args.data,
            args.out,
            layers=args.layers,
            checkpoints=args.checkpoints,
            tokens_per_domain=args.tokens_per_domain,
            batch_size=args.batch_size,
            sample_windows=args.sample_windows,
            progress=not args.no_progress,
            command=command,
        )
    except (InspectError, OSError) as error:
        print(f"moekit inspect: error: {error}", file=sys.stderr)
        return 2
    summary = results["summary"]
    print(
        f"wrote {args.out}/report.html, routing.json and {len(results['figures'])} PNGs "
        f"({summary['tokens']:,} tokens in {summary['seconds']:.1f} s)",
        file=sys.stderr,
    )
    for block, row in summary["layers"].items():
        print(
            f"  layer {block}: first choice repeated {_pct(row['repeat_first'])} "
            f"(uniform {_pct(row['repeat_first_uniform'])}, load-matched {_pct(row['repeat_first_load_matched'])}); "
            f"token id predicts expert {_pct(row['determinism'])}; entropy {row['router_entropy']:.2f} nats",
            file=sys.stderr,
        )
    if args.terminal:
        print(terminal_text(results, probe, routings, tokenizer, args.sample_windows))
    if args.json:
        print_json(summary)
    return 0

"""``moekit compare``: the literature's claims as short trainings."""

from __future__ import annotations

import argparse
import contextlib
import sys

from moekit.cli.common import add_json_flag, case_list, help_formatter, positive_int, print_json

EPILOG_COMPARE = """\
experiments:
  a  MoE vs the dense baseline of equal active compute, at equal steps and equal wall time
  b  top-1 (Switch) vs top-2
  c  capacity factor 1.0 / 1.25 / 2.0 / dropless: dropped fraction and validation loss
  d  balance loss on vs off: load imbalance over training
  e  the routers side by side
  f  control for (a): the dense baseline at 2x and 4x its FFN width, same steps

runs are reused only when their whole specification matches (model and train configs, every
field, and the training text): each lives in runs/<name>-s<seed>-<spec hash>/ with spec.json.
Ctrl-C or SIGTERM stops the whole grid (exit status 130, no results.md); the same command
then continues: finished runs are reused, the interrupted one trains again.

examples:
  moekit compare --out runs/compare                 the whole grid (results.md + PNGs)
  moekit compare --experiments a --seeds 3 --steps-a 1000
  moekit compare --quick --out /tmp/cmp             a tiny grid: checks the pipeline
"""


def add_compare(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="short trainings that reproduce the MoE literature's claims: results.md + PNGs",
        description="Run a grid of short trainings (several seeds each) and write results.md and PNG "
        "figures. Finished runs of the same specification are reused, so an interrupted grid continues "
        "where it stopped.",
        epilog=EPILOG_COMPARE,
        formatter_class=help_formatter,
    )
    parser.add_argument("--out", default="runs/compare", metavar="DIR", help="output directory")
    parser.add_argument("--experiments", type=case_list, default=None, metavar="LIST", help="subset, e.g. a,d")
    parser.add_argument(
        "--seeds", type=positive_int, default=3, help="seeds of experiments a and f (b-e use at most 2)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="steps per run of (b)-(e) (default 400; 30 --quick)"
    )
    parser.add_argument(
        "--steps-a", type=positive_int, default=None, help="steps per run of (a) and (f) (default 600; 30 --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke test")
    add_json_flag(parser)
    parser.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from moekit.experiments.compare.run import GridInterrupted, GridRunError, run_compare

    steps = args.steps if args.steps is not None else (30 if args.quick else 400)
    headline_steps = args.steps_a if args.steps_a is not None else (30 if args.quick else 600)
    command = "moekit " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else "moekit compare"
    # With --json, stdout holds the JSON document alone: everything else goes to stderr.
    human = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with human:
        try:
            summary = run_compare(args.out, args.experiments, args.seeds, steps, args.quick, command, headline_steps)
        except GridInterrupted as stop:
            during = f" during run {stop.run} ({stop.run_dir})" if stop.run else ""
            print(
                f"moekit compare: interrupted by {stop.signal_name}{during}; no results.md was written. "
                "Run the same command again to continue: finished runs are reused"
                + (", this one trains again from its start." if stop.run else "."),
                file=sys.stderr,
            )
            return 130
        except GridRunError as err:
            print(f"moekit compare: error: {err}", file=sys.stderr)
            return 1
        except (ValueError, OSError) as err:
            print(f"moekit compare: error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}/results.md")
        for name, row in summary.items():
            if name == "throughput":
                ratio = row["ratio_to_baseline"]["moe"]
                print(f"  throughput (one process, alternating): MoE {ratio:.2f}x the dense baseline")
                continue
            print(f"  {name:18s} val loss {row['val_loss_mean']:.4f} ± {row['val_loss_sd']:.4f}  "
                  f"{row['tokens_per_s']:,.0f} tok/s")
    if args.json:
        print_json(summary)
    return 0

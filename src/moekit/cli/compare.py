"""``moekit compare``: the literature's claims as short trainings."""

from __future__ import annotations

import argparse
import contextlib
import os
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
  i  the MoE recipe part by part (router init, z-loss, balance loss; the fixed eval set):
     what each does to the spread of the validation loss over 5 seeds
  g  memorizing random facts (key -> value): dense vs MoE with 4/8/16/32 experts vs a dense
     model with the E=16 MoE's total FFN width; value cross-entropy, exact match, held-out
     keys; the number of facts calibrated so the dense model stores about half (results_g.md)
  h  natural text with enough data (GCIDE, fetched once with apt-get download): first the
     ceiling, dense vs a dense model with the MoE's total FFN width; the MoE only when that
     gains >= 0.04 nats/byte; fixed held-out set, paired seeds (results_h.md, docs/text.md)

runs are reused only when their whole specification matches (model and train configs, every
field, and the training text): each lives in runs/<name>-s<seed>-<spec hash>/ with spec.json.
Ctrl-C or SIGTERM stops the whole grid (exit status 130, no results.md); the same command
then continues: finished runs are reused, the interrupted one trains again.

examples:
  moekit compare --out runs/compare                 experiments a-f and i (results.md + PNGs)
  moekit compare --experiments a --seeds 3 --steps-a 1000
  moekit compare --experiments g --steps-g 6000     experiment (g), only when asked (docs/facts.md)
  moekit compare --quick --out /tmp/cmp             a tiny grid: checks the pipeline
  moekit compare --experiments h --gcide-deb dict-gcide_0.48.5+nmu2_all.deb   (h), offline (docs/text.md)
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
        "--seeds", type=positive_int, default=3,
        help="seeds of experiments a, f, g and h (b-e use at most 2, i always 5)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="steps per run of (b)-(e) (default 400; 30 --quick)"
    )
    parser.add_argument(
        "--steps-a", type=positive_int, default=None, help="steps per run of (a) and (f) (default 600; 30 --quick)"
    )
    parser.add_argument(
        "--steps-g", type=positive_int, default=None, help="steps per run of (g) (default 6000; 20 --quick)"
    )
    parser.add_argument(
        "--facts", type=positive_int, default=None, metavar="N",
        help="facts of (g): skip its calibration and memorize N facts",
    )
    parser.add_argument(
        "--jobs", type=positive_int, default=None, metavar="N",
        help="runs of (g) and (h) trained at once, one process each (default: the CPU cores, %s here)"
        % (os.cpu_count() or 1),
    )
    parser.add_argument(
        "--steps-h", type=positive_int, default=None, help="steps per run of (h) (default 1000; 20 --quick)"
    )
    parser.add_argument(
        "--data-dir", default=None, metavar="DIR",
        help="(h): where the GCIDE .deb and its prepared text are cached (default ~/.cache/moekit/gcide)",
    )
    parser.add_argument(
        "--gcide-deb", default=None, metavar="PATH",
        help="(h): the dict-gcide .deb supplied by hand (no download; or set MOEKIT_GCIDE_DEB)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke test")
    add_json_flag(parser)
    parser.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from moekit.experiments.compare.run import EXPERIMENTS, GridInterrupted, GridRunError, run_compare
    from moekit.experiments.text.data import GcideUnavailable

    # (g) and (h) run only when named: (g) takes about 30 minutes on 2 cores by itself
    # (docs/facts.md), and (h) fetches its corpus (GCIDE) and takes about 25.
    experiments = args.experiments or list(EXPERIMENTS)
    opt_in = ("g", "h")
    unknown = sorted(set(experiments) - {*EXPERIMENTS, *opt_in})
    error = None
    if unknown:
        error = f"--experiments {','.join(unknown)} is invalid: choose from {','.join(sorted([*EXPERIMENTS, *opt_in]))}"
    elif set(experiments) <= set(opt_in) and (args.steps is not None or args.steps_a is not None):
        only = ",".join(experiments)
        error = f"--steps and --steps-a set the steps of (a)-(f), which --experiments {only} does not run; " \
                "use --steps-g or --steps-h"
    elif "g" not in experiments and (args.steps_g is not None or args.facts is not None):
        error = "--steps-g and --facts set experiment (g): add g to --experiments"
    elif "h" not in experiments and (args.steps_h is not None or args.data_dir is not None
                                     or args.gcide_deb is not None):
        error = "--steps-h, --data-dir and --gcide-deb set experiment (h): add h to --experiments"
    elif not set(opt_in) & set(experiments) and args.jobs is not None:
        error = "--jobs sets experiments (g) and (h): add g or h to --experiments"
    if error:
        print(f"moekit compare: error: {error}", file=sys.stderr)
        return 2
    grid = [name for name in experiments if name not in opt_in]
    jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
    steps = args.steps if args.steps is not None else (30 if args.quick else 400)
    headline_steps = args.steps_a if args.steps_a is not None else (30 if args.quick else 600)
    command = "moekit " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else "moekit compare"
    summary: dict = {}
    results_file = "results.md"
    # With --json, stdout holds the JSON document alone: everything else goes to stderr.
    human = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with human:
        try:
            if grid:
                summary = run_compare(args.out, grid, args.seeds, steps, args.quick, command, headline_steps)
                print(f"wrote {args.out}/results.md")
            if "g" in experiments:
                # Experiment (g) lives in its own package (it builds on this grid's run machinery).
                from moekit.experiments.facts.run import run_facts

                results_file = "results_g.md"
                summary["g"] = run_facts(args.out, args.seeds, args.steps_g, args.quick, args.facts, command,
                                         jobs=jobs)
                print(f"wrote {args.out}/results_g.md")
            if "h" in experiments:
                from moekit.experiments.text.run import run_text

                results_file = "results_h.md"
                summary["h"] = run_text(args.out, args.seeds, args.steps_h, args.quick, command, jobs=jobs,
                                        data_dir=args.data_dir, gcide_deb=args.gcide_deb)
                print(f"wrote {args.out}/results_h.md")
        except GridInterrupted as stop:
            during = f" during run {stop.run} ({stop.run_dir})" if stop.run else ""
            print(
                f"moekit compare: interrupted by {stop.signal_name}{during}; no {results_file} was written. "
                "Run the same command again to continue: finished runs are reused"
                + (", this one trains again from its start." if stop.run else "."),
                file=sys.stderr,
            )
            return 130
        except GridRunError as err:
            print(f"moekit compare: error: {err}", file=sys.stderr)
            return 1
        except GcideUnavailable as err:  # (h)'s corpus could not be fetched: the message says how to supply it
            print(f"moekit compare: error: {err}", file=sys.stderr)
            return 1
        except (ValueError, OSError) as err:
            print(f"moekit compare: error: {err}", file=sys.stderr)
            return 2
        for name, row in summary.items():
            if name == "g":
                _print_facts(row)
                continue
            if name == "h":
                _print_text(row)
                continue
            if name == "throughput":
                ratio = row["ratio_to_baseline"]["moe"]
                print(f"  throughput (one process, alternating): MoE {ratio:.2f}x the dense baseline")
                continue
            if name == "recipe":
                settings = row["settings"]
                print(f"  (i) seed spread over {row['seeds']} seeds, sd of val loss: "
                      + ", ".join(f"{setting} {values['sd']:.4f}" for setting, values in settings.items()))
                continue
            print(f"  {name:18s} val loss {row['val_loss_mean']:.4f} ± {row['val_loss_sd']:.4f}  "
                  f"{row['tokens_per_s']:,.0f} tok/s")
    if args.json:
        print_json(summary)
    return 0


def _print_facts(summary: dict) -> None:
    facts = summary["facts"]
    print(f"  (g) {facts['num_facts']:,} facts ({facts['chosen_by']}), {summary['steps']} steps:")
    for name, row in summary["models"].items():
        print(f"  {name:18s} value CE {row['value_ce_mean']:.3f} ± {row['value_ce_sd']:.3f}  "
              f"exact match {row['exact_match_mean']:.3f}  held-out CE {row['heldout_ce_mean']:.3f}")


def _print_text(summary: dict) -> None:
    ceiling = summary["ceiling"]
    print(f"  (h) {summary['steps']} steps, {summary['epoch_use']['epochs']:.3g} epochs of GCIDE: ceiling "
          f"(dense - dense-wide) {ceiling['mean']:+.4f} nats/byte" + ("" if ceiling["reached"] else
          f", below {ceiling['threshold']:g}: MoE runs skipped"))
    for name, row in summary["models"].items():
        print(f"  {name:18s} held-out {row['heldout_loss_mean']:.4f} ± {row['heldout_loss_sd']:.4f} nats/byte")
    if summary["moe"] is not None:
        diffs = " / ".join(f"{d:+.4f}" for d in summary["moe"]["moe_minus_dense"])
        print(f"  MoE - dense per seed: {diffs}")

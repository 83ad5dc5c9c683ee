"""``moekit trace``: record a run's routing trace; ``moekit trace simulate``: replay it against
expert-cache policies (LRU, LFU, Belady's optimum) at given per-layer capacities."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from moekit.cli.common import (
    UsageError,
    add_json_flag,
    check_input_path,
    fail_on_bad_input,
    help_formatter,
    positive_int,
    print_json,
    split_list,
)

EPILOG_TRACE = """\
two forms:
  moekit trace RUN --out TRACE.npz [--data FILE] [--max-tokens N]
      run held-out text through the run's model (batch 1, windows of its seq_len) and save which
      experts every token used in every MoE layer; the file says which run, step and text it is
  moekit trace simulate TRACE --capacity 4,8 [--capacity-bytes 2MiB] [--policies lru,lfu,belady]
      replay the trace one token at a time against per-layer caches of that many experts (the
      current token's experts pinned, as the expert store's cache does): hit rates, and how far
      each policy is from Belady's optimum (the best any policy can do on this trace)

examples:
  moekit train --steps 300 --out runs/q
  moekit trace runs/q --out runs/q/trace.npz                  the run's validation split
  moekit trace runs/q --data other.txt --out t.npz --max-tokens 8192
  moekit trace simulate runs/q/trace.npz --capacity 2,4,8,12
  moekit trace simulate runs/q/trace.npz --capacity-bytes 1MiB --json

A trace from an untrained model (random router weights) does not route as a trained one; simulate says so.
"""

SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(flag: str, text: str) -> int:
    """``2MiB``, ``1.5GB``, ``4096`` → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise UsageError(f"{flag} {text} is invalid: use a size such as 4096, 512KiB, 2MiB or 1.5GB")
    value = float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if value < 1:
        raise UsageError(f"{flag} {text} is invalid: must be at least 1 byte")
    return int(value)


def add_trace(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "trace",
        help="record a routing trace of a run; simulate expert-cache policies on it",
        description="Record which experts each token used per MoE layer (moekit trace RUN), or replay "
        "a trace against LRU, LFU and Belady's optimal cache policy (moekit trace simulate TRACE).",
        epilog=EPILOG_TRACE,
        formatter_class=help_formatter,
    )
    parser.add_argument("target", metavar="RUN | simulate", help="a moekit run directory, or the word simulate")
    parser.add_argument("trace", nargs="?", metavar="TRACE", help="(simulate) the trace file to replay")
    record = parser.add_argument_group("recording (moekit trace RUN)")
    record.add_argument("--out", metavar="TRACE.npz", help="the trace file to write (must not exist)")
    record.add_argument(
        "--data", metavar="FILE", default=None, help="held-out text (default: the run's validation split)"
    )
    record.add_argument(
        "--max-tokens", type=positive_int, default=4096, metavar="N", help="tokens to record (default 4096)"
    )
    simulate = parser.add_argument_group("simulating (moekit trace simulate TRACE)")
    simulate.add_argument("--capacity", type=split_list, default=None, metavar="N[,N...]",
                          help="experts cached per layer, one simulation each")
    simulate.add_argument("--capacity-bytes", type=split_list, default=None, metavar="SIZE[,SIZE...]",
                          help="bytes cached per layer (divided by the trace's expert size)")
    simulate.add_argument("--policies", type=split_list, default=["lru", "lfu", "belady"], metavar="LIST",
                          help="policies among lru, lfu, belady (default: all)")
    add_json_flag(parser, document=True)
    parser.set_defaults(func=cmd_trace)


def cmd_trace(args: argparse.Namespace) -> int:
    if args.target == "simulate":
        return _simulate(args)
    return _record(args)


def _trace_errors() -> tuple[type[BaseException], ...]:
    from moekit.experiments.quant import RunInputError
    from moekit.inference.trace import TraceError

    return (RunInputError, TraceError)


def _record(args: argparse.Namespace) -> int:
    @fail_on_bad_input("trace", *_trace_errors())
    def run(args: argparse.Namespace) -> int:
        from moekit.experiments.quant import record_run_trace

        for flag, value in (("--capacity", args.capacity), ("--capacity-bytes", args.capacity_bytes)):
            if value is not None:
                raise UsageError(f"{flag} belongs to moekit trace simulate TRACE, not to recording")
        if args.trace is not None:
            raise UsageError(f"unexpected second argument {args.trace!r}: recording takes one RUN")
        if args.out is None:
            raise UsageError("--out TRACE.npz is required to record a trace")
        out = Path(args.out)
        if out.suffix != ".npz":
            raise UsageError(f"--out {out} is invalid: the trace file name must end in .npz")
        if out.exists():
            raise UsageError(f"--out {out}: exists; choose a new file (nothing was written)")
        check_input_path("RUN", args.target, "directory")
        path, metadata = record_run_trace(args.target, args.data, out, args.max_tokens)
        print(
            f"wrote {path}: {metadata['num_tokens']} tokens, {len(metadata['layers'])} MoE layers "
            f"({metadata['source']}; {metadata['text']})",
            file=sys.stderr,
        )
        if args.json:
            print_json({"trace": str(path), "metadata": metadata})
        return 0

    return run(args)


def _simulate(args: argparse.Namespace) -> int:
    @fail_on_bad_input("trace simulate", *_trace_errors())
    def run(args: argparse.Namespace) -> int:
        from moekit.inference.policy_sim import POLICIES, capacity_from_bytes, simulate_trace
        from moekit.inference.trace import RoutingTrace

        if args.trace is None:
            raise UsageError("TRACE is missing: moekit trace simulate TRACE --capacity N")
        for flag, given in (("--out", args.out), ("--data", args.data)):
            if given is not None:
                raise UsageError(f"{flag} belongs to recording (moekit trace RUN), not to simulate")
        if not args.capacity and not args.capacity_bytes:
            raise UsageError("give --capacity N[,N...] (experts per layer) or --capacity-bytes SIZE[,SIZE...]")
        for policy in args.policies:
            if policy not in POLICIES:
                raise UsageError(f"--policies {policy} is invalid: use {', '.join(POLICIES)}")
        trace = RoutingTrace.load(check_input_path("TRACE", args.trace))
        capacities: list[tuple[int, str]] = []
        for text in args.capacity or []:
            if not text.isdigit() or int(text) < 1:
                raise UsageError(f"--capacity {text} is invalid: must be an integer >= 1 (experts per layer)")
            capacities.append((int(text), text))
        for text in args.capacity_bytes or []:
            capacities.append((capacity_from_bytes(trace, parse_size("--capacity-bytes", text)), text))
        top_k = max(trace.metadata.get("top_k") or [1])
        for experts, text in capacities:
            if experts < top_k:
                flag = "--capacity" if text.isdigit() else "--capacity-bytes"
                raise UsageError(
                    f"{flag} {text} is invalid: {experts} experts per layer is below top_k={top_k} "
                    "(a token's experts are resident together)"
                )
        meta = trace.metadata
        if not trace.trained:
            print(
                f"warning: {args.trace} comes from an untrained model ({meta.get('source')}): a random "
                "router's choices are not a trained one's, so these hit rates say nothing about a trained model's",
                file=sys.stderr,
            )
        rows = []
        for experts, text in capacities:
            results = simulate_trace(trace, experts, args.policies)
            best = max(r.hit_rate for r in results if r.policy == "belady") if "belady" in args.policies else None
            for result in results:
                row = {"capacity_given": text, **result.to_dict()}
                row["gap_to_belady"] = None if best is None else best - result.hit_rate
                rows.append(row)
        print(
            f"{args.trace}: {meta.get('model')}\n  {meta.get('source')}, trained: "
            f"{'yes' if trace.trained else 'NO'}\n  text: {meta.get('text')}\n  {trace.num_tokens} tokens, "
            f"{len(trace.layers)} MoE layers, experts {meta.get('num_experts')}, top_k {meta.get('top_k')}"
        )
        print(f"{'capacity':>14} {'policy':>7} {'hit rate':>9} {'misses':>8} {'cold':>6} {'gap to belady':>14}")
        for row in rows:
            capacity = f"{row['capacity']}" + ("" if row["capacity_given"].isdigit() else f" ({row['capacity_given']})")
            gap = "-" if row["gap_to_belady"] is None else f"{100 * row['gap_to_belady']:.1f} pts"
            print(
                f"{capacity:>14} {row['policy']:>7} {row['hit_rate']:>9.1%} {row['misses']:>8} "
                f"{row['cold_misses']:>6} {gap:>14}"
            )
        if args.json:
            print_json({"trace": str(args.trace), "metadata": meta, "results": rows})
        return 0

    return run(args)

"""``moekit bench layer`` and ``moekit bench ep``: the parsers; the benchmarks live in moekit.experiments.bench."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

from moekit.cli.common import add_json_flag, case_list, help_formatter, positive_int, print_help, print_json, split_list

EPILOG_BENCH = """\
examples:
  moekit bench layer
  moekit bench ep                         expert parallelism on 1, 2 and 4 local ranks
  moekit bench layer --quick --no-hf
  moekit bench generate --families mixtral,qwen3_moe --dtype bfloat16   prefill/decode tokens/s
  moekit bench offload                    an expert store at memory budgets below the model
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

allocator (--malloc): the headline column is measured with glibc malloc at its defaults, as
moekit train and your own scripts run. With --malloc both (the default) every case runs again
in a second process in which glibc keeps freed memory for reuse (no fresh pages, and no page
faults, for every large buffer), shown in the "malloc reuse" column; targets judge the headline.
The table's first line names the CPU.

examples:
  moekit bench layer                      all cases, 7 rounds, both allocator settings
  moekit bench layer --cases 2,3 --rounds 11 --malloc default
  moekit bench layer --no-hf --json > bench.json      stdout: one JSON document (table on stderr)
  moekit bench layer --quick              tiny sizes, 2 rounds: a smoke test
"""


# --------------------------------------------------------------------------------------------
# moekit bench ...
# --------------------------------------------------------------------------------------------


def add_bench(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks: MoE cost as a ratio to the dense equivalent; generation tokens/s",
        description="Benchmarks. The layer figures are ratios to the dense equivalent; generate reports "
        "tokens/s of whole models and their ratios to transformers.",
        epilog=EPILOG_BENCH,
        formatter_class=help_formatter,
    )
    bench.set_defaults(func=lambda args: print_help(bench))
    bench_sub = bench.add_subparsers(title="benchmarks", metavar="BENCHMARK")
    add_bench_layer(bench_sub)
    add_bench_ep(bench_sub)
    add_bench_generate(bench_sub)
    add_bench_offload(bench_sub)


def add_bench_layer(subparsers: argparse._SubParsersAction) -> None:
    from moekit.experiments.bench.layer import MALLOC_MODES

    parser = subparsers.add_parser(
        "layer",
        help="one MoE layer's fwd+bwd time and peak memory vs the dense equivalent",
        description="Time (fwd+bwd) and peak activation memory of the MoE layer, as ratios to "
        "its dense equivalent, next to transformers' MoE blocks.",
        epilog=EPILOG_BENCH_LAYER,
        formatter_class=help_formatter,
    )
    parser.add_argument(
        "--cases", type=case_list, default=None, metavar="LIST", help="cases to run, e.g. 1,4 (default: all)"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=None, metavar="N", help="timed rounds per implementation "
        "(default 7; 2 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: a smoke test")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparisons")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for weights and inputs")
    parser.add_argument(
        "--malloc",
        choices=MALLOC_MODES,
        default="both",
        help="allocator settings to measure: glibc defaults (the headline, what users get), "
        "reuse of freed memory (in a second process), or both side by side (default both)",
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    add_json_flag(parser)
    parser.set_defaults(func=cmd_bench_layer)


def _measured(command: str, measure: Callable[[], Any]) -> tuple[Any, int]:
    """``(measure(), 0)``; bad input (ValueError) or Ctrl-C: a message and ``(None, 2 or 130)``."""
    try:
        return measure(), 0
    except ValueError as err:
        print(f"moekit {command}: error: {err}", file=sys.stderr)
        return None, 2
    except KeyboardInterrupt:
        print(f"moekit {command}: interrupted; nothing was reported", file=sys.stderr)
        return None, 130


def cmd_bench_layer(args: argparse.Namespace) -> int:
    from moekit.experiments.bench.layer import bench_layer

    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 7)
    # With --json, stdout holds the JSON document alone: the table goes to stderr.
    human = sys.stderr if args.json else sys.stdout
    report, status = _measured("bench layer", lambda: bench_layer(
        case_keys=args.cases,
        rounds=rounds,
        quick=args.quick,
        use_hf=not args.no_hf,
        seed=args.seed,
        malloc=args.malloc,
    ))
    if report is None:
        return status
    print(report.table(), file=human)
    if args.json:
        print_json(report.to_dict())
    return 1 if args.strict and not report.passed else 0


EPILOG_EP = """\
columns (per rank, per layer, per training step = forward + backward):
  sent MB      bytes this rank sent to other ranks through all-to-all (measured)
  formula MB   4·T·k·D·b·(R−1)/R + 8·(E/R)·(R−1): uniform routing (docs/scaling.md)
  routing / all-to-all / experts / combine   milliseconds in each stage
  step ms      the whole step; x1 = the 1-process step of this run

examples:
  moekit bench ep                        1, 2 and 4 ranks, 2048 tokens per rank
  moekit bench ep --ranks 1,2 --tokens 4096 --experts 16
  moekit bench ep --quick --json         tiny sizes: a smoke test; stdout one JSON document
"""


def _rank_list(text: str) -> list[int]:
    try:
        ranks = [int(part) for part in split_list(text)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected rank counts such as 1,2,4, got {text!r}") from error
    if not ranks or any(rank < 1 for rank in ranks):
        raise argparse.ArgumentTypeError(f"expected rank counts >= 1 such as 1,2,4, got {text!r}")
    return ranks


def add_bench_ep(subparsers: argparse._SubParsersAction) -> None:
    from moekit.experiments.bench.expert_parallel import EPCase

    parser = subparsers.add_parser(
        "ep",
        help="expert parallelism on 1, 2, 4 local ranks: all-to-all bytes and time per stage",
        description="One MoE layer's experts sharded over R local gloo ranks (started by this command): "
        "all-to-all bytes per rank and step, and the time in routing, all-to-all, experts and combine.",
        epilog=EPILOG_EP,
        formatter_class=help_formatter,
    )
    defaults = EPCase()
    parser.add_argument("--ranks", type=_rank_list, default=[1, 2, 4], metavar="LIST", help="default 1,2,4")
    parser.add_argument("--tokens", type=int, default=None, help=f"tokens per rank (default {defaults.tokens})")
    parser.add_argument("--experts", type=int, default=defaults.num_experts, help="routed experts E")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="experts per token")
    parser.add_argument("--d-model", type=int, default=None, help=f"model width (default {defaults.d_model})")
    parser.add_argument("--d-ff", type=int, default=None, help=f"expert hidden size (default {defaults.d_ff})")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps (default {defaults.steps})")
    parser.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 steps: a smoke test")
    parser.add_argument(
        "--start-method", choices=("spawn", "fork"), default="spawn", help="how ranks start (default spawn)"
    )
    add_json_flag(parser)
    parser.set_defaults(func=cmd_bench_ep)


def cmd_bench_ep(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from moekit.config import MoEConfig
    from moekit.experiments.bench.expert_parallel import EPCase, bench_ep, table

    quick = EPCase(d_model=32, d_ff=32, tokens=64, steps=2) if args.quick else EPCase()
    case = EPCase(
        d_model=args.d_model or quick.d_model,
        d_ff=args.d_ff or quick.d_ff,
        num_experts=args.experts,
        top_k=args.top_k,
        tokens=args.tokens or quick.tokens,
        steps=args.steps or quick.steps,
        capacity_factor=args.capacity_factor,
    )
    try:
        MoEConfig(d_model=case.d_model, d_ff=case.d_ff, num_experts=case.num_experts, top_k=case.top_k,
                  capacity_factor=case.capacity_factor)
        for name in ("tokens", "steps"):
            if getattr(case, name) < 1:
                raise ValueError(f"--{name} {getattr(case, name)} is invalid: must be >= 1")
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            rows = bench_ep(case, args.ranks, args.start_method)
    except ValueError as error:
        print(f"moekit bench ep: error: {error}", file=sys.stderr)
        return 2
    human = sys.stderr if args.json else sys.stdout
    print(
        f"moekit bench ep: one MoE layer, E={case.num_experts} top-{case.top_k} d={case.d_model} f={case.d_ff} "
        f"{'dropless' if case.capacity_factor is None else f'capacity {case.capacity_factor}'}, float32, gloo on "
        f"{os.cpu_count()} CPU cores, 1 thread per rank; per rank, per layer and training step (fwd+bwd), "
        f"median of {case.steps} steps",
        file=human,
    )
    print(table(rows), file=human)
    if args.json:
        print_json({"case": asdict(case), "rows": [asdict(row) for row in rows]})
    return 0


EPILOG_GENERATE = """\
columns (per family; batch 1, greedy; one model with random weights, >= 1 GB at --dtype):
  prefill tok/s   prompt tokens / time of the prompt's forward and the first new token
  decode tok/s    new tokens after the first / their time (one forward each, KV cache)
  x tf            median of the per-round ratios to transformers as loaded
  MB/token        weights one decoded token reads: attention + norms + router + the k selected
                  experts (+ shared experts) per layer + one embedding row + output head
                  (the formula: docs/bench_generate.md)
  weights GB/s    MB/token x decode tok/s, beside the memory bandwidth measured in the same
                  run (sum of a 1 GiB buffer); "of bw" is its share
  tokens          whether the greedy tokens equal transformers' (--strict: exit 1 if not)

implementations: transformers as loaded; a deep copy after moekit.interop.patch_moe;
moekit's own MoETransformerLM where the family converts (Mixtral, via from_hf_model). Each
round runs each once, the order rotated from round to round; figures are medians over rounds.
One family's models are alive at a time.

examples:
  moekit bench generate                                    every family, float32, 3 rounds
  moekit bench generate --families mixtral,gpt_oss --dtype bfloat16 --rounds 5
  moekit bench generate --prompt-tokens 128 --new-tokens 64 --json > gen.json   stdout: one JSON document
  moekit bench generate --quick                            tiny models, 2 rounds: a smoke test
"""


def _family_list(text: str) -> list[str]:
    from moekit.experiments.bench.generate import FAMILIES

    names = split_list(text)
    unknown = [name for name in names if name not in FAMILIES]
    if not names or unknown:
        shown_names = ", ".join(unknown) if unknown else repr(text)
        raise argparse.ArgumentTypeError(f"unknown family {shown_names}: choose from {', '.join(FAMILIES)}")
    return names


def add_bench_generate(subparsers: argparse._SubParsersAction) -> None:
    from moekit.experiments.bench.generate import DTYPES, FAMILIES

    parser = subparsers.add_parser(
        "generate",
        help="prefill and decode tokens/s of transformers MoE models, as loaded, after patch_moe, and moekit's LM",
        description="Generation speed (batch 1, greedy) of one model per MoE family with random weights:\n"
        "transformers as loaded, the same model after patch_moe, and moekit's own LM where the family\n"
        "converts; the weights read per decoded token beside the measured memory bandwidth.",
        epilog=EPILOG_GENERATE,
        formatter_class=help_formatter,
    )
    parser.add_argument(
        "--families", type=_family_list, default=None, metavar="LIST",
        help=f"families to run, comma-separated (default: all of {', '.join(FAMILIES)})",
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32", help="weights and compute (default float32)"
    )
    parser.add_argument(
        "--prompt-tokens", type=positive_int, default=None, metavar="N",
        help="prompt length (default 512; 16 with --quick)",
    )
    parser.add_argument(
        "--new-tokens", type=positive_int, default=None, metavar="N",
        help="greedy new tokens, >= 2 (default 128; 8 with --quick)",
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=None, metavar="N", help="alternating rounds (default 3; 2 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny models (2 layers, d=32): a smoke test in seconds")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the weights and the prompt")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when any greedy tokens differ from transformers'"
    )
    add_json_flag(parser, document=True)
    parser.set_defaults(func=cmd_bench_generate)


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from moekit.experiments.bench.generate import bench_generate

    # stdout holds the JSON document alone with --json: main runs this inside json_output, so
    # the table printed here goes to stderr then.
    report, status = _measured("bench generate", lambda: bench_generate(
        families=args.families,
        dtype=args.dtype,
        prompt_tokens=args.prompt_tokens if args.prompt_tokens is not None else (16 if args.quick else 512),
        new_tokens=args.new_tokens if args.new_tokens is not None else (8 if args.quick else 128),
        rounds=args.rounds if args.rounds is not None else (2 if args.quick else 3),
        quick=args.quick,
        seed=args.seed,
    ))
    if report is None:
        return status
    print(report.table())
    if args.json:
        print_json(report.to_dict())
    if not report.identical_tokens:
        print(
            "moekit bench generate: WARNING: greedy tokens differ from transformers' (see the tokens column)"
            + ("; exit status 1 (--strict)" if args.strict else ""),
            file=sys.stderr,
        )
        return 1 if args.strict else 0
    return 0


EPILOG_OFFLOAD = """\
rows (one moekit LM with random weights; experts >= 4x the last-level cache, <= ~2 GB):
  in memory       the plain LM, every expert resident: the reference of every ratio
  store B%        moekit.inference.load(store, memory_budget = non-expert bytes + B% of the
                  expert bytes), experts in the model's dtype (--budgets, default 100,50,25)
  int8 B%, int4 B%  the store packed with --experts-dtype int8 / int4, at B% of the same-dtype
                  expert bytes (--int8-budget 51, --int4-budget 25: the issue's budgets)

columns (batch 1; medians over --rounds, the rows' order rotated each round; every decode step is
fed the next token of one fixed random sequence, not its argmax: a random model's greedy output
soon repeats one token, which routes to the same experts every step, so the cache would hit
far more often than on any text):
  budget MB       memory_budget: non-expert bytes + the expert cache
  fit             whether every expert of the row's store has a slot at that budget
  prefill/s       prompt tokens / time of the prompt's forward and the first new token (cold)
  decode/s        later new tokens / their time (cold: the expert cache emptied and the store's
                  files evicted from the page cache with posix_fadvise(DONTNEED) before the run)
  x mem           decode tokens/s over the in-memory row's of the same round (median of ratios)
  warm dec/s      a second run right after the cold one, with the cache it left
  exact           every step's logits equal the in-memory model's bit for bit (int8/int4: the
                  in-memory model with the same quantized experts)
  peak MB         RSS + the store's page-cache bytes (mincore), sampled during the cold run,
                  over their value at its start, plus the non-expert bytes
  limit MB        the budget + 5%
  hit             the cold run's expert-cache hit rate
  LRU sim, Belady the policy simulator on the run's routing trace at the row's slots per layer
                  (the random weights' routing, or --routing-trace's; the output says which)
The header prints the CPU, the last-level cache, the expert bytes and the storage read
bandwidth measured on the store's expert files (O_DIRECT, or buffered after eviction).

examples:
  moekit bench offload                                  bf16, budgets 100,50,25, int8 51%, int4 25%
  moekit bench offload --budgets 100,75,50,25 --rounds 5
  moekit bench offload --json > offload.json            stdout: one JSON document
  moekit bench offload --quick                          a tiny model: a smoke test in seconds
  moekit bench offload --routing-trace trace.npz        replay a trained model's expert choices
"""


def _budget_list(text: str) -> list[float]:
    from moekit.experiments.bench.offload import parse_budget_percent

    parts = split_list(text)
    if not parts:
        raise argparse.ArgumentTypeError(f"expected percentages of the expert bytes such as 100,50,25, got {text!r}")
    try:
        return [parse_budget_percent(part, "--budgets") for part in parts]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--budgets: ")) from error


def _budget_percent(text: str) -> float:
    from moekit.experiments.bench.offload import parse_budget_percent

    try:
        return parse_budget_percent(text, "budget")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("budget: ")) from error


def add_bench_offload(subparsers: argparse._SubParsersAction) -> None:
    from moekit.experiments.bench.offload import DTYPES

    parser = subparsers.add_parser(
        "offload",
        help="prefill and decode tokens/s from an expert store at memory budgets, vs all in memory",
        description="Generation (batch 1, greedy) of one moekit LM with random weights from an expert store at\n"
        "memory budgets of 100%, 50% and 25% of its expert bytes, and int8 / int4 experts, against the\n"
        "same model all in memory; bit-exactness, peak resident bytes, cache hit rates beside LRU and\n"
        "Belady on the run's trace, and the measured storage read bandwidth.",
        epilog=EPILOG_OFFLOAD,
        formatter_class=help_formatter,
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                        help="the model's weights and compute (default bfloat16)")
    parser.add_argument("--budgets", type=_budget_list, default=None, metavar="LIST",
                        help="same-dtype budgets, %% of the expert bytes, in (0, 100] (default 100,50,25)")
    parser.add_argument("--int8-budget", type=_budget_percent, default=51.0, metavar="PCT",
                        help="the int8 row's budget, %% of the same-dtype expert bytes (default 51)")
    parser.add_argument("--int4-budget", type=_budget_percent, default=25.0, metavar="PCT",
                        help="the int4 row's budget, %% of the same-dtype expert bytes (default 25)")
    parser.add_argument("--no-quant", action="store_true", help="skip the int8 and int4 rows")
    parser.add_argument("--prompt-tokens", type=positive_int, default=None, metavar="N",
                        help="prompt length (default 128; 16 with --quick)")
    parser.add_argument("--new-tokens", type=positive_int, default=None, metavar="N",
                        help="greedy new tokens, >= 2 (default 64; 8 with --quick)")
    parser.add_argument("--rounds", type=positive_int, default=None, metavar="N",
                        help="timed rounds (default 3; 1 with --quick)")
    parser.add_argument("--layers", type=positive_int, default=None, metavar="N",
                        help="the model's layers (default: enough for experts >= 4x the last-level cache, "
                        "at least 10, at most ~2 GB of experts)")
    parser.add_argument("--dir", default=None, metavar="DIR",
                        help="where the temporary stores are written (default: the system's temporary "
                        "directory); they are removed at the end")
    parser.add_argument("--quick", action="store_true", help="a tiny model (2 layers, d=128): a smoke test")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the weights and the prompt")
    parser.add_argument("--routing-trace", default=None, metavar="TRACE",
                        help="a routing trace (moekit trace record) whose expert choices every row replays: a "
                        "trained model's locality instead of the random weights' (its experts and top-k must "
                        "match the model's: 16 and 2; 8 and 2 with --quick)")
    parser.add_argument("--cache-policy", choices=("lru", "lfu"), default="lru",
                        help="the store rows' expert cache policy (default lru; moekit sample --cache-policy)")
    add_json_flag(parser, document=True)
    parser.set_defaults(func=cmd_bench_offload)


def cmd_bench_offload(args: argparse.Namespace) -> int:
    from moekit.experiments.bench.offload import DEFAULT_BUDGETS, bench_offload

    if args.dir is not None and not os.path.isdir(args.dir):
        print(f"moekit bench offload: error: --dir {args.dir}: not a directory", file=sys.stderr)
        return 2
    new_tokens = args.new_tokens if args.new_tokens is not None else (8 if args.quick else 64)
    if new_tokens < 2:
        print(f"moekit bench offload: error: --new-tokens {new_tokens} is invalid: decode needs >= 2",
              file=sys.stderr)
        return 2
    quant_budgets = {} if args.no_quant else {"int8": args.int8_budget, "int4": args.int4_budget}
    report, status = _measured("bench offload", lambda: bench_offload(
        dtype=args.dtype,
        budgets=args.budgets if args.budgets is not None else DEFAULT_BUDGETS,
        quant_budgets=quant_budgets,
        prompt_tokens=args.prompt_tokens if args.prompt_tokens is not None else (16 if args.quick else 128),
        new_tokens=new_tokens,
        rounds=args.rounds if args.rounds is not None else (1 if args.quick else 3),
        quick=args.quick,
        seed=args.seed,
        layers=args.layers,
        directory=args.dir,
        log=lambda message: print(f"moekit bench offload: {message}", file=sys.stderr),
        routing_trace=args.routing_trace,
        cache_policy=args.cache_policy,
    ))
    if report is None:
        return status
    print(report.table())
    if args.json:
        print_json(report.to_dict())
    return 0

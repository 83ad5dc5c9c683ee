"""``moekit pack`` (a model as an expert store) and ``moekit sample STORE --memory-budget``.

    moekit pack runs/my --out stores/my                 a moekit run
    moekit pack ~/models/mixtral --out stores/mixtral   a local transformers Mixtral folder
    moekit pack runs/my --out stores/my-int4 --experts-dtype int4   experts quantized (int8 or int4)
    moekit sample stores/mixtral --memory-budget 4GiB --json
"""

from __future__ import annotations

import argparse
import sys
import time

from moekit.cli.common import (
    UsageError,
    add_json_flag,
    check,
    check_input_path,
    check_new_out,
    fail_on_bad_input,
    help_formatter,
    print_json,
)

EPILOG_PACK = """\
The store holds every routed expert as one 4 KiB-aligned blob (read with one pread), the other
weights as resident.safetensors, and index.json. `moekit sample STORE --memory-budget SIZE`
then runs the model with the experts in a cache of at most the budget's remaining bytes.

examples:
  moekit pack runs/my --out stores/my
  moekit pack ~/models/mixtral-8x7b --out stores/mixtral --json
  moekit pack runs/my --out stores/my-int8 --experts-dtype int8     experts quantized as they stream
  moekit sample stores/mixtral --memory-budget 24GiB --prompt "The" --greedy
"""


def add_pack(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pack",
        help="write a model as an expert store, for sampling in less memory than it needs",
        description="Convert a moekit run directory or a local transformers Mixtral folder into an expert "
        "store, tensor by tensor (the peak memory is a small multiple of the largest tensor).",
        epilog=EPILOG_PACK,
        formatter_class=help_formatter,
    )
    parser.add_argument("model", metavar="MODEL", help="a moekit run directory or a local transformers Mixtral folder")
    parser.add_argument("--out", required=True, metavar="STORE", help="the store directory to write: new or empty")
    parser.add_argument(
        "--experts-dtype", choices=("same", "int8", "int4"), default="same",
        help="how the experts are stored: same = their own dtype; int8 = per output channel; int4 = groups "
        "of 128 along each projection's input (d_model and d_ff must be multiples of 128); "
        "quantized as they stream, packed for PyTorch's CPU kernels",
    )
    add_json_flag(parser, document=True)
    parser.set_defaults(func=cmd_pack)


@fail_on_bad_input("pack", ValueError, OSError)
def cmd_pack(args: argparse.Namespace) -> int:
    from moekit.inference.offload import format_size, plan_memory
    from moekit.inference.store import ExpertStore, QuantizedCodec, StoreError, expert_codec, model_layout, write_store
    from moekit.interop.stream import model_tensor_stream

    check_input_path("MODEL", args.model, "directory")
    out = check_new_out("--out", args.out)
    started = time.perf_counter()
    stream = model_tensor_stream(args.model)
    codec = expert_codec(args.experts_dtype, stream.config.moe)
    if isinstance(codec, QuantizedCodec):
        try:
            codec.check_shapes(model_layout(stream.config))
        except StoreError as error:
            raise UsageError(f"--experts-dtype {args.experts_dtype}: {error}") from error
    write_store(out, stream.config, stream.tensors, args.experts_dtype, stream.tokenizer, stream.source)
    store = ExpertStore(out, verify=False)
    plan = plan_memory(store, None)
    seconds = time.perf_counter() - started
    print(f"wrote {out} in {seconds:.1f} s: {len(store.blobs)} expert blobs in {len(store.expert_files)} files")
    print(f"  non-expert weights  {format_size(plan.non_expert_bytes)}")
    print(f"  experts             {format_size(plan.expert_bytes)} ({args.experts_dtype})")
    print(f"  minimum budget      {format_size(plan.minimum_bytes)} (non-expert + top_k experts per MoE layer)")
    if args.json:
        print_json({"store": str(out), "source": stream.source, "experts_dtype": args.experts_dtype,
                    "expert_blobs": len(store.blobs), "seconds": seconds,
                    "non_expert_bytes": plan.non_expert_bytes, "expert_bytes": plan.expert_bytes,
                    "minimum_budget_bytes": plan.minimum_bytes})
    return 0


# --------------------------------------------------------------------------------------------
# moekit sample STORE --memory-budget SIZE
# --------------------------------------------------------------------------------------------


def memory_size(text: str) -> int:
    """argparse type of --memory-budget: 4GiB, 512MiB, 1.5GB or plain bytes."""
    from moekit.inference.offload import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def is_store_dir(path: str) -> bool:
    from moekit.inference.store import is_store

    return is_store(path)


def sample_store(args: argparse.Namespace) -> int:
    """``moekit sample`` of an expert store (its flags validated by ``cmd_sample``)."""
    import torch

    from moekit import matvec
    from moekit.inference.offload import BudgetError, load
    from moekit.inference.residency import resident_bytes
    from moekit.training.data import tokenizer_from_dict

    if not is_store_dir(args.run_dir):
        raise UsageError(f"--memory-budget needs an expert store as MODEL, and {args.run_dir} is not one; "
                         f"make one with: moekit pack {args.run_dir} --out STORE")
    if args.top_p is not None:
        raise UsageError("--top-p applies to transformers folders; an expert store samples with --top-k")
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    try:
        model = load(args.run_dir, memory_budget=args.memory_budget, dtype=dtype,
                     cache_policy=args.cache_policy or "lru")
    except BudgetError as error:
        raise UsageError(f"--memory-budget {args.memory_budget}: {error}") from error
    store, cache = model.expert_store, model.expert_cache
    tokenizer = tokenizer_from_dict(store.tokenizer() or {"kind": "bytes"})
    vocab = model.config.vocab_size
    if args.top_k is not None:
        check("--top-k", args.top_k, args.top_k <= vocab, f"must be <= the model's vocabulary ({vocab} tokens)")
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise UsageError(f"--prompt {args.prompt!r} encodes to no tokens: give at least one character")
    generator = torch.Generator().manual_seed(args.seed)
    idx = torch.tensor([prompt] * args.samples, dtype=torch.long)
    # As for a run: the prompt's forward alone (prefill), then the whole generation.
    started = time.perf_counter()
    with torch.no_grad():
        model(idx)
    prefill_s = time.perf_counter() - started
    prefill_stats = cache.stats()
    cache.reset_counters()
    started = time.perf_counter()
    out = model.generate(
        idx, args.tokens, temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
        use_cache=not args.no_cache, generator=generator,
    )
    decode_s = max(1e-9, time.perf_counter() - started - prefill_s)
    generate_stats = cache.stats()
    residency = resident_bytes(store.files)
    texts = [tokenizer.decode(row.tolist()) for row in out]
    for i, text in enumerate(texts):
        if args.samples > 1:
            print(f"--- sample {i + 1}")
        print(text)
    print(f"expert cache: generation {generate_stats.hits} hits, {generate_stats.misses} misses "
          f"(hit rate {generate_stats.hit_rate:.1%}), {generate_stats.bytes_read / 2**20:,.1f} MiB read; "
          f"resident now {residency.total_bytes / 2**30:.3f} GiB (RSS + the store's page-cache pages)",
          file=sys.stderr)
    if args.json:
        print_json({
            "samples": texts,
            "prefill_tokens_per_s": idx.numel() / max(prefill_s, 1e-9),
            "decode_tokens_per_s": args.tokens * args.samples / decode_s,
            "dtype": args.dtype,
            "matvec": matvec.status(),  # the one-row kernels' state (moekit.matvec)
            "memory": model.memory_plan.to_dict(),
            "cache_policy": cache.policy,
            # "generate" counts model.generate's whole run, its own forward of the prompt included.
            "expert_cache": {"prefill": prefill_stats.to_dict(), "generate": generate_stats.to_dict()},
            "residency": residency.to_dict(),
        })
    return 0

"""``moekit train`` and ``moekit sample``."""

from __future__ import annotations

import argparse
import os
import sys

from moekit.cli.common import add_json_flag, help_formatter, positive_int, print_json

# --------------------------------------------------------------------------------------------
# moekit train / sample
# --------------------------------------------------------------------------------------------

EPILOG_TRAIN = """\
examples:
  moekit train                                   small MoE on tiny Shakespeare (~5 min, 2 CPU cores)
  moekit train --data my.txt --experts 16 --top-k 2 --out runs/my
  moekit train --router switch --top-k 1 --capacity-factor 1.25 --moe-every 2
  moekit train --arch dense --out runs/dense     the dense baseline of equal active compute
  moekit train --resume runs/my --steps 6000     continue exactly where the run stopped
  torchrun --nproc_per_node 1 -m moekit train    (single process; same as plain moekit train)
  torchrun --nproc_per_node 4 -m moekit train --expert-parallel 4 --out runs/ep4
                                                 experts sharded over 4 ranks, the rest data-parallel
"""

# Model flags: (flag, LMConfig/MoEConfig field, type, help). None = the config's default.
_MODEL_FLAGS = [
    ("--arch", "arch", str, "moe, or dense: the baseline with the MoE's active FLOPs per token"),
    ("--router", "moe.router", str, "topk, switch, gshard, noisy_topk, expert_choice, aux_free"),
    ("--experts", "moe.num_experts", int, "routed experts per MoE layer"),
    ("--top-k", "moe.top_k", int, "experts per token"),
    ("--d-ff", "moe.d_ff", int, "hidden size of one expert"),
    ("--shared-experts", "moe.num_shared_experts", int, "shared experts every token goes through"),
    ("--balance-loss-coef", "moe.balance_loss_coef", float, "weight of the Switch balance loss"),
    ("--z-loss-coef", "moe.z_loss_coef", float, "weight of the router z-loss"),
    ("--moe-every", "moe_every", int, "every n-th layer is MoE (1 = all, 2 = alternate)"),
    ("--d-model", "d_model", int, "model width"),
    ("--layers", "n_layer", int, "transformer blocks"),
    ("--heads", "n_head", int, "attention heads"),
    ("--seq-len", "seq_len", int, "context length in tokens"),
    ("--dropout", "dropout", float, "dropout on attention and residual branches"),
]
_TRAIN_FLAGS = [
    ("--batch-size", "batch_size", int, "sequences per micro-batch"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
    ("--steps", "steps", int, "optimizer steps (with --resume: the new total)"),
    ("--lr", "lr", float, "peak learning rate (warmup, then cosine decay)"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay on matrices"),
    ("--grad-clip", "grad_clip", float, "max global gradient norm (0 = off)"),
    ("--eval-interval", "eval_interval", int, "steps between validations"),
    ("--checkpoint-interval", "checkpoint_interval", int, "steps between checkpoints"),
    ("--seed", "seed", int, "seed of weights, data order and routing noise"),
    ("--tokenizer", "tokenizer", str, "bytes (vocab 256) or bpe (trained on the corpus)"),
    ("--max-minutes", "max_minutes", float, "stop after this much training time"),
    ("--device", "device", str, "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps"),
]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _capacity_factor(text: str) -> float | None:
    if text.lower() in ("none", "dropless"):
        return None
    return float(text)


def add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an MoE (or dense baseline) language model on a text file",
        description="Train a language model whose FFN blocks are MoE layers. Without flags: a "
        "small MoE on the built-in tiny Shakespeare corpus.",
        epilog=EPILOG_TRAIN,
        formatter_class=help_formatter,
    )
    parser.add_argument("--data", default=None, metavar="FILE", help="UTF-8 text file (default: tiny Shakespeare)")
    parser.add_argument("--out", default=None, metavar="DIR", help="run directory (default: runs/<arch>-<time>)")
    parser.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR exactly")
    parser.add_argument(
        "--capacity-factor", type=_capacity_factor, default=argparse.SUPPRESS, metavar="CF",
        help="expert capacity factor; 'none' = dropless (the default)",
    )  # fmt: skip
    for flag, _, kind, text in _MODEL_FLAGS + _TRAIN_FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--expert-parallel", type=positive_int, default=1, metavar="N",
        help="shard every MoE layer's experts over N ranks (launch with torchrun --nproc_per_node N); "
        "other weights are data-parallel",
    )  # fmt: skip
    add_json_flag(parser)
    parser.set_defaults(func=cmd_train)


def _configs_from_args(args: argparse.Namespace):  # noqa: ANN202
    from dataclasses import replace

    from moekit.models.lm import LMConfig
    from moekit.training.config import default_configs

    model_config, train_config = default_configs()
    model_values = model_config.to_dict()
    given: dict[str, object] = {}
    for flag, field, _, _ in _MODEL_FLAGS:
        value = getattr(args, _dest(flag))
        if value is None:
            continue
        given[flag] = value
        if field.startswith("moe."):
            model_values["moe"][field[4:]] = value
        else:
            model_values[field] = value
    if hasattr(args, "capacity_factor"):
        given["--capacity-factor"] = args.capacity_factor
        model_values["moe"]["capacity_factor"] = args.capacity_factor
    model_values["moe"]["d_model"] = model_values["d_model"]
    if model_values["moe"]["router"] == "switch" and "--top-k" not in given:
        model_values["moe"]["top_k"] = 1
    train_values = {}
    for flag, field, _, _ in _TRAIN_FLAGS:
        value = getattr(args, _dest(flag))
        if value is not None:
            train_values[field] = value
    if args.data is not None:
        train_values["data"] = args.data
    if args.steps is not None and args.max_minutes is None:
        # The default time budget belongs to the default recipe: an explicit step count is the budget.
        train_values["max_minutes"] = None
    if args.bf16:
        train_values["bf16"] = True
    return LMConfig.from_dict(model_values), replace(train_config, **train_values), given


def cmd_train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from moekit.distributed.env import ExpertParallelError
    from moekit.training.checkpoint import CheckpointError, read_run_config
    from moekit.training.data import DataError
    from moekit.training.trainer import train

    try:
        model_config, train_config, given = _configs_from_args(args)
        if args.resume:
            out = Path(args.resume)
            saved = read_run_config(out)
            conflicts = _resume_conflicts(saved["model"], model_config.to_dict(), given)
            if conflicts:
                raise CheckpointError(
                    f"{out / 'config.json'}: the run was trained with {', '.join(conflicts)}; "
                    "model flags cannot change on --resume"
                )
            if args.steps is None:
                train_config.steps = saved["train"]["steps"]
        else:
            if args.expert_parallel > 1 and args.out is None:
                raise ValueError(
                    f"--expert-parallel {args.expert_parallel} needs --out DIR: every rank must name the same run "
                    "directory (the default one is named after each process's start time)"
                )
            out = Path(args.out or f"runs/{model_config.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
        result = train(
            model_config, train_config, out, resume=bool(args.resume), progress=not args.no_progress,
            expert_parallel=args.expert_parallel,
        )  # fmt: skip
    except (ValueError, OSError) as err:
        kind = "data" if isinstance(err, DataError) else "error"
        print(f"moekit train: {kind}: {err}", file=sys.stderr)
        return 2
    except ExpertParallelError as err:
        print(f"moekit train: error: {err}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for all
        return 130 if result.interrupted else 0
    _print_train_summary(result)
    if args.json:
        print_json(result.to_dict())
    return 130 if result.interrupted else 0


def _resume_conflicts(saved: dict, wanted: dict, given: dict) -> list[str]:
    conflicts = []
    for flag, field, _, _ in _MODEL_FLAGS:
        if flag not in given:
            continue
        saved_value = saved["moe"][field[4:]] if field.startswith("moe.") else saved[field]
        if saved_value != given[flag]:
            conflicts.append(f"{flag} {saved_value} (not {given[flag]})")
    if "--capacity-factor" in given and saved["moe"]["capacity_factor"] != given["--capacity-factor"]:
        conflicts.append(f"--capacity-factor {saved['moe']['capacity_factor']} (not {given['--capacity-factor']})")
    return conflicts


def _print_train_summary(result) -> None:  # noqa: ANN001
    print(
        f"\nrun {result.run_dir}: {result.steps} steps in {result.train_seconds / 60:.1f} min"
        + (" (interrupted; resume with --resume)" if result.interrupted else "")
    )
    print(f"  validation loss  {result.val_loss:.4f} nats/token   {result.bits_per_byte:.4f} bits/byte")
    print(f"  train loss       {result.train_loss:.4f}")
    print(f"  throughput       {result.tokens_per_s:,.0f} tokens/s")
    print(f"  parameters       {result.total_params:,} total, {result.active_params:,} active per token")
    if result.load_imbalance is not None:
        print(f"  expert load      max/mean {result.load_imbalance:.2f}, dropped {result.dropped_fraction:.3f}")
    print(f"  plots            {', '.join(result.plots)}")


EPILOG_SAMPLE = """\
examples:
  moekit sample runs/moe-20260101-120000 --prompt "ROMEO:" --tokens 300
  moekit sample RUN_DIR --temperature 0      greedy decoding
"""


def add_sample(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate text from a trained run (KV cache)",
        description="Generate text from the latest checkpoint of a run directory.",
        epilog=EPILOG_SAMPLE,
        formatter_class=help_formatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    parser.add_argument("--samples", type=positive_int, default=1, help="independent samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the context every token")
    add_json_flag(parser)
    parser.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from moekit.training.checkpoint import load_model_from_run
    from moekit.training.data import tokenizer_from_dict

    try:
        if args.tokens < 0:
            raise ValueError(f"--tokens {args.tokens} is invalid: must be >= 0")
        model, payload = load_model_from_run(args.run_dir)
        tokenizer = tokenizer_from_dict(payload.get("tokenizer", {"kind": "bytes"}))
        prompt = tokenizer.encode(args.prompt)
        if not prompt:
            raise ValueError("--prompt is empty: give at least one character")
        model.eval()
        generator = torch.Generator().manual_seed(args.seed)
        idx = torch.tensor([prompt] * args.samples, dtype=torch.long)
        out = model.generate(
            idx, args.tokens, temperature=args.temperature, top_k=args.top_k,
            use_cache=not args.no_cache, generator=generator,
        )  # fmt: skip
    except (ValueError, OSError) as err:
        print(f"moekit sample: error: {err}", file=sys.stderr)
        return 2
    texts = [tokenizer.decode(row.tolist()) for row in out]
    for i, text in enumerate(texts):
        if args.samples > 1:
            print(f"--- sample {i + 1}")
        print(text)
    if args.json:
        print_json({"samples": texts})
    return 0


"""``moekit train`` and ``moekit sample``.

``moekit train`` has one flag per field of ``LMConfig``, ``MoEConfig`` and ``TrainConfig``,
derived from the dataclasses: the flag is the field's name in kebab case (``FLAG_ALIASES``
keeps the older short names), the help text is the field's ``metadata["help"]``, the type its
annotation (``X | None`` fields take ``none``; bools are ``--flag/--no-flag``). The configs
validate the values; a ``ConfigError`` is reported with the flag the user typed.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.cli.common import (
    UsageError,
    add_json_flag,
    check,
    check_count,
    check_input_path,
    check_non_negative,
    fail,
    fail_on_bad_input,
    help_formatter,
    positive_int,
    print_json,
    shown,
)
from moekit.cli.pack import is_store_dir, memory_size, sample_store

# --------------------------------------------------------------------------------------------
# Flags derived from the config dataclasses
# --------------------------------------------------------------------------------------------

# Sections: "model" = LMConfig, "moe" = LMConfig.moe (MoEConfig), "train" = TrainConfig.
SECTION_OWNERS = {"LMConfig": "model", "MoEConfig": "moe", "TrainConfig": "train"}
SECTION_TITLES = {
    "model": "model (LMConfig)",
    "moe": "MoE layers (MoEConfig)",
    "train": "training (TrainConfig)",
}
# The flag names moekit train had before its flags were derived; the other fields' flags are
# their kebab-case names.
FLAG_ALIASES = {
    ("moe", "num_experts"): "--experts",
    ("moe", "num_shared_experts"): "--shared-experts",
    ("model", "n_layer"): "--layers",
    ("model", "n_head"): "--heads",
}
# moe.d_model follows d_model (LMConfig.with_changes); LMConfig.moe is the "moe" section.
NOT_FLAGS = {("moe", "d_model"), ("model", "moe")}
# Fields whose flag also takes this word for None (kept from before: --capacity-factor dropless).
FLAG_METAVARS = {("train", "data"): "FILE|none", ("train", "device"): "DEVICE"}
NONE_WORDS = {("moe", "capacity_factor"): ("none", "dropless"), ("moe", "eval_capacity_factor"): ("none", "dropless")}


@dataclass(frozen=True)
class ConfigFlag:
    section: str  # model, moe or train
    field: str
    flag: str
    kind: type  # int, float, str or bool
    nullable: bool  # the annotation is X | None: the flag takes "none"
    help: str
    choices: tuple[str, ...] | None

    @property
    def dest(self) -> str:
        return f"config.{self.section}.{self.field}"


def _annotation(text: str) -> tuple[type, bool]:
    """``"float | None"`` -> (float, True). The annotations are strings (``from __future__``)."""
    parts = [part.strip() for part in str(text).split("|")]
    names = [part for part in parts if part != "None"]
    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    if len(names) != 1 or names[0] not in kinds:
        raise TypeError(f"config field annotation {text!r}: no flag type for it")
    return kinds[names[0]], len(names) < len(parts)


def config_flags() -> list[ConfigFlag]:
    """One flag per config field (but moe.d_model and the moe section itself), in field order."""
    from dataclasses import fields

    from moekit.config import MoEConfig
    from moekit.models.lm import LMConfig
    from moekit.training.config import TrainConfig

    flags = []
    for section, cls in (("model", LMConfig), ("moe", MoEConfig), ("train", TrainConfig)):
        for field in fields(cls):
            if (section, field.name) in NOT_FLAGS:
                continue
            kind, nullable = _annotation(field.type)
            flag = FLAG_ALIASES.get((section, field.name), "--" + field.name.replace("_", "-"))
            if "help" not in field.metadata:
                raise TypeError(f"{cls.__name__}.{field.name} has no metadata['help'] for its flag")
            choices = field.metadata.get("choices")
            flags.append(ConfigFlag(section, field.name, flag, kind, nullable, field.metadata["help"],
                                    tuple(choices) if choices else None))
    names = [flag.flag for flag in flags]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise TypeError(f"two config fields derive the same flag: {duplicates}; add an alias to FLAG_ALIASES")
    return flags


def _value_parser(flag: ConfigFlag):
    none_words = NONE_WORDS.get((flag.section, flag.field), ("none",)) if flag.nullable else ()
    expected = {int: "an integer", float: "a number", str: "a word"}[flag.kind]
    if none_words:
        expected += " or " + " or ".join(none_words)

    def parse(text: str) -> Any:
        if text.lower() in none_words:
            return None
        if flag.choices is not None and text not in flag.choices:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(flag.choices)})")
        try:
            return flag.kind(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from err

    parse.__name__ = flag.kind.__name__
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> list[ConfigFlag]:
    """Add one flag per config field, grouped by section; an absent flag leaves no attribute."""
    from moekit.training.config import default_configs

    model, train = default_configs()
    defaults = {"model": model, "moe": model.moe, "train": train}
    flags = config_flags()
    groups = {section: parser.add_argument_group(title) for section, title in SECTION_TITLES.items()}
    for flag in flags:
        default = getattr(defaults[flag.section], flag.field)
        text = f"{flag.help} (default: {shown(default)})".replace("%", "%%")
        group = groups[flag.section]
        if flag.kind is bool:
            group.add_argument(flag.flag, dest=flag.dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
            continue
        if (flag.section, flag.field) in FLAG_METAVARS:
            metavar = FLAG_METAVARS[flag.section, flag.field]
        elif flag.choices is not None:
            metavar = "{" + ",".join(flag.choices) + "}"
        else:
            metavar = {int: "N", float: "X", str: "TEXT"}[flag.kind] + ("|none" if flag.nullable else "")
        group.add_argument(flag.flag, dest=flag.dest, type=_value_parser(flag), default=argparse.SUPPRESS,
                           metavar=metavar, help=text)
    return flags


def given_flags(args: argparse.Namespace) -> dict[ConfigFlag, Any]:
    """The config flags on the command line, with their parsed values."""
    return {flag: getattr(args, flag.dest) for flag in args.config_flags if hasattr(args, flag.dest)}


def flag_of(flags: list[ConfigFlag], owner: str, field: str) -> ConfigFlag | None:
    """The flag of a ``ConfigError``'s field (``LMConfig.moe.d_model`` -> --d-model)."""
    section = SECTION_OWNERS.get(owner)
    if field == "moe.d_model" or (section, field) == ("moe", "d_model"):
        section, field = "model", "d_model"
    return next((flag for flag in flags if (flag.section, flag.field) == (section, field)), None)


def configs_from_flags(base_model, base_train, given: dict[ConfigFlag, Any], flags: list[ConfigFlag]):
    """``base_model``/``base_train`` with the given flags applied, validated; a bad value is a
    ``UsageError`` naming the flag."""
    from dataclasses import replace

    from moekit.config import ConfigError

    changes: dict[str, dict[str, Any]] = {"model": {}, "moe": {}, "train": {}}
    for flag, value in given.items():
        changes[flag.section][flag.field] = value
    try:
        model = base_model.with_changes(changes["model"], changes["moe"])
        train = replace(base_train, **changes["train"])
    except ConfigError as err:
        flag = flag_of(flags, err.owner, err.field)
        if flag is None:
            raise
        default = "" if flag in given else " (the default)"
        raise UsageError(
            f"{flag.flag} {shown(err.value)}{default} is invalid: {err.allowed} ({err.owner}.{err.field}={err.value!r})"
        ) from err
    return model, train


# --------------------------------------------------------------------------------------------
# moekit train
# --------------------------------------------------------------------------------------------

EPILOG_TRAIN = """\
Every field of the model, MoE layer and training configs has a flag (listed by section above);
'none' sets an optional field to None, --no-FLAG turns a switch off.

examples:
  moekit train                                   small MoE on tiny Shakespeare (~5 min, 2 CPU cores)
  moekit train --data my.txt --experts 16 --top-k 2 --out runs/my
  moekit train --router switch --capacity-factor 1.25 --moe-every 2    (switch: top-k 1)
  moekit train --n-kv-head 2 --drop-priority score --eval-capacity-factor 2
  moekit train --arch dense --out runs/dense     the dense baseline of equal active compute
  moekit train --resume runs/my --steps 6000     continue exactly where the run stopped
  moekit train --max-minutes none --steps 3000 --json > result.json
  torchrun --nproc_per_node 1 -m moekit train    (single process; same as plain moekit train)
  torchrun --nproc_per_node 4 -m moekit train --expert-parallel 4 --out runs/ep4
                                                 experts sharded over 4 ranks, the rest data-parallel
"""


def add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an MoE (or dense baseline) language model on a text file",
        description="Train a language model whose FFN blocks are MoE layers. Without flags: a "
        "small MoE on the built-in tiny Shakespeare corpus.",
        epilog=EPILOG_TRAIN,
        formatter_class=help_formatter,
    )
    parser.add_argument("--out", default=None, metavar="DIR", help="new run directory (default: runs/<arch>-<time>)")
    parser.add_argument(
        "--resume", default=None, metavar="DIR",
        help="continue the run in DIR exactly; of the config flags only --steps may be given (the new total)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--expert-parallel", type=positive_int, default=1, metavar="N",
        help="shard every MoE layer's experts over N ranks (launch with torchrun --nproc_per_node N); "
        "other weights are data-parallel",
    )
    add_json_flag(parser, document=True)
    parser.set_defaults(func=cmd_train, config_flags=add_config_flags(parser))


# --steps extends the run; --device and --compile say where and how this process trains, not what
# the run is. Every other config flag must match the run on --resume.
RESUME_MAY_CHANGE = {("train", "steps"), ("train", "device"), ("train", "compile")}


def _same_value(flag: ConfigFlag, saved: Any, given: Any) -> bool:
    if flag.field == "data" and saved is not None and given is not None:
        return Path(saved).resolve() == Path(given).resolve()
    return saved == given


def _resume_configs(args: argparse.Namespace, given: dict[ConfigFlag, Any]):
    """The run's saved configs; every given config flag but --steps must match them."""
    from moekit.config import ConfigError
    from moekit.models.lm import LMConfig
    from moekit.training.checkpoint import CONFIG_FILE, read_run_config
    from moekit.training.config import TrainConfig

    if args.out is not None:
        raise UsageError(f"--out {args.out} with --resume {args.resume}: a resumed run stays in its directory; "
                         "drop --out")
    run_dir = Path(args.resume)
    config_path = run_dir / CONFIG_FILE
    saved = read_run_config(run_dir)  # CheckpointError naming the file
    try:
        saved_model = LMConfig.from_dict(saved["model"])
        saved_train = TrainConfig.from_dict(saved["train"])
    except KeyError as err:
        raise UsageError(f"{config_path}: no {err.args[0]!r} section; not a moekit run config") from err
    except (ConfigError, ValueError, TypeError) as err:
        raise UsageError(f"{config_path}: {err}") from err
    conflicts = []
    for flag, value in given.items():
        if (flag.section, flag.field) in RESUME_MAY_CHANGE:
            continue
        owner = {"model": saved_model, "moe": saved_model.moe, "train": saved_train}[flag.section]
        if not _same_value(flag, getattr(owner, flag.field), value):
            conflicts.append(f"{flag.flag} {shown(getattr(owner, flag.field))} (not {shown(value)})")
    if conflicts:
        raise UsageError(
            f"{config_path}: the run was trained with {', '.join(conflicts)}; "
            "on --resume only --steps (and --device, --compile) may change"
        )
    model, train = configs_from_flags(saved_model, saved_train, given, args.config_flags)  # validates --steps
    return model, train, run_dir


def _new_run_configs(args: argparse.Namespace, given: dict[ConfigFlag, Any]):
    import time
    from dataclasses import replace

    from moekit.training.checkpoint import CHECKPOINT_DIR, CONFIG_FILE
    from moekit.training.config import default_configs

    model, train = configs_from_flags(*default_configs(), given, args.config_flags)
    given_fields = {(flag.section, flag.field) for flag in given}
    if ("train", "steps") in given_fields and ("train", "max_minutes") not in given_fields:
        # The default time budget belongs to the default recipe: an explicit step count is the budget.
        train = replace(train, max_minutes=None)
    if any((flag.section, flag.field) == ("model", "vocab_size") for flag in given):
        # The trainer sizes the vocabulary from the tokenizer; a different --vocab-size would be ignored.
        if train.tokenizer == "bpe":
            raise UsageError(f"--vocab-size {model.vocab_size} is invalid with --tokenizer bpe: the BPE tokenizer "
                             "sets the vocabulary; use --bpe-vocab-size")
        check("--vocab-size", model.vocab_size, model.vocab_size == 256, "the bytes tokenizer has 256 tokens "
              "(for another size use --tokenizer bpe --bpe-vocab-size N)")
    if train.data is not None:
        check_input_path("--data", train.data)
    if args.expert_parallel > 1 and args.out is None:
        raise UsageError(
            f"--expert-parallel {args.expert_parallel} needs --out DIR: every rank must name the same run "
            "directory (the default one is named after each process's start time)"
        )
    out = Path(args.out or f"runs/{model.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a directory")
    if (out / CONFIG_FILE).exists() or (out / CHECKPOINT_DIR).exists():
        raise UsageError(f"--out {out}: already holds a run; pass --resume {out} to continue it, or choose "
                         "another --out (nothing was overwritten)")
    return model, train, out


def cmd_train(args: argparse.Namespace) -> int:
    from moekit.distributed.env import ExpertParallelError
    from moekit.training import trainer
    from moekit.training.data import DataError

    try:
        given = given_flags(args)
        if args.resume:
            model_config, train_config, out = _resume_configs(args, given)  # without --steps: the saved total
        else:
            model_config, train_config, out = _new_run_configs(args, given)
        result = trainer.train(
            model_config, train_config, out, resume=bool(args.resume), progress=not args.no_progress,
            expert_parallel=args.expert_parallel,
        )
    except (ValueError, OSError) as err:
        return fail("train", f"data: {err}" if isinstance(err, DataError) else err)
    except (ExpertParallelError, trainer.TrainingDiverged) as err:
        print(f"moekit train: error: {err}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for all
        return 130 if result.interrupted else 0
    _print_train_summary(result)
    if args.json:
        print_json(result.to_dict())
    return 130 if result.interrupted else 0


def _print_train_summary(result) -> None:
    done = f"\nrun {result.run_dir}: {result.steps} steps in {result.train_seconds / 60:.1f} min"
    if result.stopped_by == "max_minutes":
        done += f", stopped by --max-minutes at step {result.steps} of {result.target_steps}"
    elif result.interrupted:
        done += (f", stopped by {result.stop_signal or 'an interrupt'} at step {result.steps} of "
                 f"{result.target_steps}; continue with --resume {result.run_dir}")
    print(done)
    print(f"  validation loss  {result.val_loss:.4f} nats/token   {result.bits_per_byte:.4f} bits/byte")
    print(f"  train loss       {result.train_loss:.4f}")
    print(f"  throughput       {result.tokens_per_s:,.0f} tokens/s")
    print(f"  parameters       {result.total_params:,} total, {result.active_params:,} active per token")
    if result.load_imbalance is not None:
        print(f"  expert load      max/mean {result.load_imbalance:.2f}, dropped {result.dropped_fraction:.3f}")
    print(f"  plots            {', '.join(result.plots)}")


# --------------------------------------------------------------------------------------------
# moekit sample
# --------------------------------------------------------------------------------------------

EPILOG_SAMPLE = """\
MODEL is a moekit run directory, or a local transformers MoE folder (config.json, safetensors,
tokenizer.json): its MoE blocks then run as moekit layers (moekit.interop.patch_moe), its
attention and norms as transformers' own.

examples:
  moekit sample runs/moe-20260101-120000 --prompt "ROMEO:" --tokens 300
  moekit sample RUN_DIR --greedy             greedy decoding (same as --temperature 0)
  moekit sample RUN_DIR --samples 3 --json   {"samples": [...], "prefill_tokens_per_s": ...} on stdout
  moekit sample ~/models/olmoe-tiny --prompt "The" --top-p 0.9 --dtype bfloat16 --json
  moekit sample STORE --memory-budget 4GiB --json   an expert store (moekit pack): experts cached in 4 GiB
"""


def _optional_int(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {text!r}") from err


def add_sample(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate text from a trained run or a local transformers MoE folder",
        description="Generate text from the latest checkpoint of a run directory, or from a local "
        "transformers MoE folder whose MoE blocks then run as moekit layers.",
        epilog=EPILOG_SAMPLE,
        formatter_class=help_formatter,
    )
    parser.add_argument("run_dir", metavar="MODEL", help="a moekit run directory or a local transformers folder")
    parser.add_argument("--prompt", default="\n", help="text to continue, at least one character (default: a newline)")
    parser.add_argument("--tokens", type=int, default=200, metavar="N", help="tokens to generate, >= 1 (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, metavar="T",
                        help="softmax temperature, finite and >= 0; 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=_optional_int, default=None, metavar="K|none",
                        help="sample among the K likeliest tokens; none = all (default)")
    parser.add_argument("--samples", type=positive_int, default=1, metavar="N", help="independent samples (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling, >= 0 (default 0)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the context every token (moekit runs)")
    parser.add_argument("--greedy", action="store_true", help="always the likeliest token (= --temperature 0)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="nucleus sampling in (0, 1] (transformers folders; moekit runs take --top-k)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and activations (default float32)")
    parser.add_argument("--memory-budget", type=memory_size, default=None, metavar="SIZE",
                        help="MODEL is an expert store (moekit pack): hold at most SIZE of weights (e.g. 4GiB, "
                        "512MiB, 1.5GB, bytes), the experts in a cache; default: every expert once read")
    parser.add_argument("--cache-policy", choices=("lru", "lfu"), default=None,
                        help="MODEL is an expert store: which expert a miss evicts, the least recently (lru, "
                        "default) or least frequently used (lfu)")
    add_json_flag(parser, document=True)
    parser.set_defaults(func=cmd_sample)


def _is_moekit_run(path: Path) -> bool:
    """A transformers folder's config.json names its model_type; anything else is read (and
    its problems reported) as a moekit run."""
    import json

    try:
        payload = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return True
    return not (isinstance(payload, dict) and ("model_type" in payload or "architectures" in payload))


def _sample_hf_folder(args: argparse.Namespace) -> int:
    from moekit.inference.generate import SamplingConfig
    from moekit.interop.patch import generate_from_folder

    if args.top_k is not None or args.samples != 1 or args.no_cache:
        given = "--top-k" if args.top_k is not None else "--samples" if args.samples != 1 else "--no-cache"
        raise UsageError(f"{given} applies to moekit runs; for a transformers folder use --top-p, --greedy, "
                         "--temperature")
    greedy = args.greedy or args.temperature == 0
    sampling = SamplingConfig(greedy=greedy, temperature=args.temperature if not greedy else 1.0,
                              top_p=args.top_p if args.top_p is not None else 1.0, seed=args.seed)
    result, patched = generate_from_folder(args.run_dir, args.prompt, args.tokens, sampling, dtype=args.dtype)
    print(args.prompt + result.text)
    print(f"prefill {result.prefill_tokens_per_s:,.1f} tokens/s, decode {result.decode_tokens_per_s:,.1f} "
          f"tokens/s; {len(patched)} MoE blocks run as moekit layers", file=sys.stderr)
    if args.json:
        from moekit import matvec

        print_json({**result.to_dict(), "patched_blocks": len(patched), "dtype": args.dtype,
                    "matvec": matvec.status()})
    return 0


@fail_on_bad_input("sample", ValueError, OSError)
def cmd_sample(args: argparse.Namespace) -> int:
    check_count("--tokens", args.tokens)
    check_non_negative("--temperature", args.temperature)
    if args.top_k is not None:
        check_count("--top-k", args.top_k)
    check("--seed", args.seed, 0 <= args.seed < 2**63, "must be an integer in [0, 2**63)")
    if not args.prompt:
        raise UsageError("--prompt is empty: give at least one character")
    if args.top_p is not None:
        check("--top-p", args.top_p, 0 < args.top_p <= 1, "must be in (0, 1]")
    if args.memory_budget is not None or is_store_dir(args.run_dir):
        return sample_store(args)
    if args.cache_policy is not None:
        raise UsageError(f"--cache-policy applies to expert stores (moekit pack); {args.run_dir} is not one "
                         "and holds every expert in memory")
    if not _is_moekit_run(Path(args.run_dir)):
        return _sample_hf_folder(args)
    if args.top_p is not None:
        raise UsageError("--top-p applies to transformers folders; a moekit run samples with --top-k")

    import time

    import torch

    from moekit.experts import set_expert_layout
    from moekit.hugepages import place_in_huge_pages
    from moekit.training.checkpoint import load_model_from_run
    from moekit.training.data import tokenizer_from_dict

    model, payload = load_model_from_run(args.run_dir)
    tokenizer = tokenizer_from_dict(payload.get("tokenizer", {"kind": "bytes"}))
    vocab = model.config.vocab_size
    if args.top_k is not None:
        check("--top-k", args.top_k, args.top_k <= vocab, f"must be <= the model's vocabulary ({vocab} tokens)")
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise UsageError(f"--prompt {args.prompt!r} encodes to no tokens: give at least one character")
    model.eval()
    if args.dtype == "bfloat16":
        model.to(torch.bfloat16)
    set_expert_layout(model, "rows")  # the layout moekit.matvec decodes fastest (moekit.experts)
    place_in_huge_pages(model)  # decoding streams the weights: fewer TLB misses (moekit.hugepages)
    generator = torch.Generator().manual_seed(args.seed)
    idx = torch.tensor([prompt] * args.samples, dtype=torch.long)
    # Prefill and decode timed apart: the prompt's forward alone, then the whole generation.
    started = time.perf_counter()
    with torch.no_grad():
        model(idx)
    prefill_s = time.perf_counter() - started
    started = time.perf_counter()
    out = model.generate(
        idx, args.tokens, temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
        use_cache=not args.no_cache, generator=generator,
    )
    decode_s = max(1e-9, time.perf_counter() - started - prefill_s)
    texts = [tokenizer.decode(row.tolist()) for row in out]
    for i, text in enumerate(texts):
        if args.samples > 1:
            print(f"--- sample {i + 1}")
        print(text)
    if args.json:
        from moekit import matvec

        print_json({"samples": texts, "prefill_tokens_per_s": idx.numel() / max(prefill_s, 1e-9),
                    "decode_tokens_per_s": args.tokens * args.samples / decode_s, "dtype": args.dtype,
                    "matvec": matvec.status()})
    return 0

"""``moekit params``, ``export``, ``import``, ``finetune`` and ``upcycle``.

    moekit params mixtral-8x7b                 total / active parameters, FLOPs, memory
    moekit params path/to/config.json --json   a transformers config.json, or a run directory
    moekit export runs/my --hf hf/my           a folder transformers' from_pretrained loads
    moekit export runs/my --gguf my.gguf       a file llama.cpp and ollama run
    moekit import hf/mixtral --out runs/mx     a local Mixtral folder as a moekit run directory
    moekit finetune --from runs/my --data new.txt --out runs/ft --freeze experts
    moekit upcycle runs/dense --out runs/up --experts 8 --top-k 2
"""

from __future__ import annotations

import argparse

from moekit.cli.common import (
    UsageError,
    add_json_flag,
    check,
    check_count,
    check_input_path,
    check_new_out,
    check_positive,
    fail_on_bad_input,
    help_formatter,
    print_json,
)
from moekit.models.cost import COMPONENTS, ModelCost
from moekit.models.presets import PRESETS


def _check_config_field(cls: type, field: str, value: object, flag: str) -> None:
    """Validate one flag that sets a config field the way the config does, naming the flag."""
    from moekit.config import ConfigError

    try:
        cls(**{field: value})
    except ConfigError as err:
        raise UsageError(f"{flag} {value} is invalid: {err.allowed}") from err


def _check_seed(value: int) -> None:
    check("--seed", value, 0 <= value < 2**63, "must be an integer in [0, 2**63)")


def add_interop(subparsers: argparse._SubParsersAction) -> None:
    add_params(subparsers)
    add_export(subparsers)
    add_import(subparsers)
    add_finetune(subparsers)
    add_upcycle(subparsers)


# --------------------------------------------------------------------------------------------
# moekit params
# --------------------------------------------------------------------------------------------

EPILOG_PARAMS = f"""\
presets: {", ".join(PRESETS)}

examples:
  moekit params mixtral-8x7b
  moekit params deepseek-v3 --context 8192
  moekit params ~/models/Qwen3-30B-A3B/config.json --json
  moekit params runs/moe-20260101-120000
"""


def add_params(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "params",
        help="total vs active parameters, FLOPs per token and weight memory of an MoE model",
        description="Parameter arithmetic of an MoE model from its config alone (nothing is downloaded "
        "or allocated): a preset, a Hugging Face config.json (mixtral, qwen2_moe, qwen3_moe, olmoe, "
        "deepseek_v3, switch_transformers) or a moekit run directory.",
        epilog=EPILOG_PARAMS,
        formatter_class=help_formatter,
    )
    parser.add_argument("model", metavar="PRESET|CONFIG|RUN_DIR")
    parser.add_argument(
        "--context", type=int, default=None, metavar="N",
        help="tokens of context for the attention FLOPs, >= 1 (default 4096)",
    )
    add_json_flag(parser, document=True)
    parser.set_defaults(func=cmd_params)


def _human(count: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return f"{count:.0f}"


def print_cost(cost: ModelCost, context: int) -> None:
    total, active = cost.total, cost.active
    print(f"{cost.name} ({cost.family})")
    print(f"  total parameters   {total:>20,}  ({_human(total)})")
    print(f"  active per token   {active:>20,}  ({_human(active)}, {active / total:.1%})")
    if cost.num_experts:
        print(f"  MoE layers         {cost.moe_layers} of {cost.num_layers}, {cost.num_experts} routed experts, "
              f"top-{cost.top_k}")
    print(f"\n  {'component':<16}{'total':>20}{'active':>20}")
    active_parts = cost.active_components
    for name in COMPONENTS:
        if cost.components[name]:
            print(f"  {name:<16}{cost.components[name]:>20,}{active_parts[name]:>20,}")
    flops = cost.forward_flops_per_token(context)
    print(f"\n  forward FLOPs      {flops:,} per token ({flops / 1e9:,.2f} GFLOP) at {context} tokens of context")
    print("  weight memory      " + "   ".join(
        f"{dtype} {size / 1e9:,.1f} GB" for dtype, size in cost.memory_bytes().items()))
    print()
    import textwrap

    print(textwrap.fill(cost.explanation(), width=100, initial_indent="  ", subsequent_indent="  "))


@fail_on_bad_input("params", ValueError, OSError)
def cmd_params(args: argparse.Namespace) -> int:
    from moekit.models.cost import load_cost

    if args.context is not None:
        check_count("--context", args.context)
    cost = load_cost(args.model)
    context = args.context if args.context is not None else 4096
    print_cost(cost, context)
    if args.json:
        payload = cost.to_dict(context)
        payload["explanation"] = cost.explanation()
        print_json(payload)
    return 0


# --------------------------------------------------------------------------------------------
# moekit export / import
# --------------------------------------------------------------------------------------------


def add_export(subparsers: argparse._SubParsersAction) -> None:
    from moekit.interop.gguf import GGUF_TYPES

    parser = subparsers.add_parser(
        "export",
        help="write a run as a Hugging Face Mixtral folder (from_pretrained loads it) or a GGUF file (llama.cpp)",
        description="Write the latest checkpoint of a run directory as a transformers MixtralForCausalLM "
        "folder (config.json + model.safetensors), or as a GGUF file that llama.cpp and ollama run with "
        "their llama architecture (as they run Mixtral). Only runs whose model Mixtral can express convert: "
        "topk router, SwiGLU experts, an MoE FFN in every layer, dropless, no shared experts.",
        epilog="examples:\n  moekit export runs/my --hf hf/my\n  moekit export runs/my --hf hf/my --force   "
        "replace the folder's files\n  moekit export runs/my --gguf my.gguf\n"
        "  moekit export runs/my --gguf my-f16.gguf --gguf-type f16\n",
        formatter_class=help_formatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--hf", metavar="OUT_DIR",
        help="folder to write: new or empty (a non-empty one needs --force; a moekit run directory never)",
    )
    target.add_argument(
        "--gguf", metavar="OUT_FILE",
        help="GGUF file to write (an existing one needs --force; never inside a moekit run directory)",
    )
    parser.add_argument(
        "--gguf-type", default="f32", choices=GGUF_TYPES,
        help="--gguf: precision of the weight matrices (norms and routers stay f32; default f32)",
    )
    parser.add_argument("--force", action="store_true", help="write into a non-empty --hf folder, or replace --gguf")
    add_json_flag(parser, document=True)
    parser.set_defaults(func=cmd_export)


@fail_on_bad_input("export", ValueError, OSError, ImportError)
def cmd_export(args: argparse.Namespace) -> int:
    if args.gguf is not None:
        from moekit.interop.gguf import export_run_gguf

        written = export_run_gguf(args.run_dir, args.gguf, args.gguf_type, force=args.force)
        print(f"wrote {written.path} ({written.gguf_type}, {written.tensors} tensors, "
              f"{written.file_bytes / 1e6:.1f} MB; llama.cpp: llama-cli -m {str(written.path)!r})")
        if args.json:
            print_json({"run_dir": str(args.run_dir), **written.to_dict()})
        return 0
    from moekit.interop.hf import export_run

    out = export_run(args.run_dir, args.hf, force=args.force)
    print(f"wrote {out} (transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    if args.json:
        print_json({"run_dir": str(args.run_dir), "hf_dir": str(out)})
    return 0


def add_import(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="read a local Hugging Face Mixtral folder into a run directory",
        description="Read a local transformers Mixtral folder (config.json, safetensors shards, and "
        "tokenizer.json unless the vocabulary is 256 bytes) into a moekit run directory that "
        "`moekit sample` and `moekit finetune` use. Nothing is downloaded.",
        epilog="examples:\n  moekit import ~/models/tiny-mixtral --out runs/tiny-mixtral\n",
        formatter_class=help_formatter,
    )
    parser.add_argument("hf_dir", metavar="HF_DIR")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write (new or empty)")
    add_json_flag(parser, document=True)
    parser.set_defaults(func=cmd_import)


@fail_on_bad_input("import", ValueError, OSError)
def cmd_import(args: argparse.Namespace) -> int:
    from moekit.interop.hf import import_hf_folder

    check_new_out("--out", args.out)
    out = import_hf_folder(args.hf_dir, args.out)
    print(f"wrote run directory {out}")
    if args.json:
        print_json({"hf_dir": str(args.hf_dir), "run_dir": str(out)})
    return 0


# --------------------------------------------------------------------------------------------
# moekit finetune / upcycle
# --------------------------------------------------------------------------------------------

EPILOG_FINETUNE = """\
freeze modes:
  none         train every parameter
  router       keep the routers as they are, train everything else
  experts      keep the routed and shared experts, train attention, embeddings, norms, routers
  non-experts  train only the experts

examples:
  moekit finetune --from runs/my --data new.txt --out runs/ft
  moekit finetune --from runs/my --data new.txt --out runs/ft2 --freeze experts --expert-dropout 0.2
  moekit finetune --from hf/tiny-mixtral --data new.txt --out runs/ft3 --seq-len 128 --json
"""


def add_finetune(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a run or a Hugging Face Mixtral folder on a text file (early stopping)",
        description="Fine-tune with the auxiliary losses on, optional expert dropout and frozen parameter "
        "groups, evaluating every --eval-interval steps and stopping after --patience evaluations "
        "without improvement; the best weights are kept.",
        epilog=EPILOG_FINETUNE,
        formatter_class=help_formatter,
    )
    parser.add_argument("--from", dest="source", required=True, metavar="RUN_DIR|HF_DIR")
    parser.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file (90%% train, 10%% validation)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    parser.add_argument("--freeze", default="none", choices=("none", "router", "experts", "non-experts"))
    parser.add_argument("--expert-dropout", type=float, default=0.0, metavar="P",
                        help="dropout inside the experts, in [0, 1) (default 0)")
    parser.add_argument("--steps", type=int, default=200, metavar="N", help="maximum optimizer steps (default 200)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, finite and > 0 (default 1e-3)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per step (default 16)")
    parser.add_argument("--seq-len", type=int, default=None, metavar="N",
                        help="training context (default: the model's)")
    parser.add_argument("--eval-interval", type=int, default=25, metavar="N",
                        help="steps between validations (default 25)")
    parser.add_argument("--patience", type=int, default=3, metavar="N",
                        help="validations without improvement before stopping, >= 1 (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed, >= 0 (default 0)")
    parser.add_argument("--no-progress", action="store_true")
    add_json_flag(parser, document=True)
    parser.set_defaults(func=cmd_finetune)


@fail_on_bad_input("finetune", ValueError, OSError)
def cmd_finetune(args: argparse.Namespace) -> int:
    from moekit.config import MoEConfig
    from moekit.interop.hf import load_run_or_hf_folder
    from moekit.models.lm import LMConfig
    from moekit.training.config import TrainConfig
    from moekit.training.finetune import finetune

    _check_config_field(MoEConfig, "expert_dropout", args.expert_dropout, "--expert-dropout")
    for flag, field in (("--steps", "steps"), ("--lr", "lr"), ("--batch-size", "batch_size"),
                        ("--eval-interval", "eval_interval")):
        _check_config_field(TrainConfig, field, getattr(args, field), flag)
    if args.seq_len is not None:
        _check_config_field(LMConfig, "seq_len", args.seq_len, "--seq-len")
    check_count("--patience", args.patience)
    _check_seed(args.seed)
    check_input_path("--data", args.data)
    check_new_out("--out", args.out)
    result = finetune(
        args.source, args.data, args.out, args.freeze, args.expert_dropout, args.steps, args.lr,
        args.batch_size, args.seq_len, args.eval_interval, patience=args.patience, seed=args.seed,
        progress=not args.no_progress, loader=load_run_or_hf_folder,
    )
    print(f"run {result.run_dir}: freeze={result.freeze}, expert dropout {result.expert_dropout}")
    print(f"  validation loss  {result.val_loss_before:.4f} -> {result.val_loss_after:.4f} (best at step "
          f"{result.best_step} of {result.steps}{', stopped early' if result.stopped_early else ''})")
    print(f"  parameters       {result.trainable_params:,} trained, {result.frozen_params:,} frozen")
    if result.interrupted:
        print(f"  interrupted at step {result.steps}: the best weights so far (step {result.best_step}) are saved")
    if args.json:
        print_json(result.to_dict())
    return 130 if result.interrupted else 0


def add_upcycle(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "upcycle",
        help="turn a dense run into an MoE run (sparse upcycling)",
        description="Sparse upcycling (Komatsuzaki et al. 2022): every expert starts as a copy of the "
        "dense FFN, the router starts near zero, and the renormalized top-k weights sum to 1, so the "
        "new model computes exactly what the dense one did until it is trained.",
        epilog="examples:\n  moekit upcycle runs/dense --out runs/upcycled --experts 8 --top-k 2\n"
        "  moekit finetune --from runs/upcycled --data corpus.txt --out runs/upcycled-ft\n",
        formatter_class=help_formatter,
    )
    parser.add_argument("dense_run", metavar="DENSE_RUN_DIR")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write (new or empty)")
    parser.add_argument("--experts", type=int, default=8, metavar="N", help="routed experts per MoE layer (default 8)")
    parser.add_argument("--top-k", type=int, default=2, metavar="K", help="experts per token, <= --experts (default 2)")
    parser.add_argument("--moe-every", type=int, default=1, metavar="N",
                        help="every n-th layer becomes MoE (default 1: all)")
    parser.add_argument("--router-std", type=float, default=1e-3, metavar="STD",
                        help="std of the router's initial weights, finite and > 0 (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the routers' initial weights, >= 0 (default 0)")
    add_json_flag(parser, document=True)
    parser.set_defaults(func=cmd_upcycle)


@fail_on_bad_input("upcycle", ValueError, OSError)
def cmd_upcycle(args: argparse.Namespace) -> int:
    from moekit.config import MoEConfig
    from moekit.models.cost import count_parameters
    from moekit.models.lm import LMConfig
    from moekit.training.finetune import upcycle

    _check_config_field(MoEConfig, "num_experts", args.experts, "--experts")
    check_count("--top-k", args.top_k)
    check("--top-k", args.top_k, args.top_k <= args.experts, f"must be <= --experts {args.experts}")
    _check_config_field(LMConfig, "moe_every", args.moe_every, "--moe-every")
    check_positive("--router-std", args.router_std)
    _check_seed(args.seed)
    check_new_out("--out", args.out)
    model = upcycle(args.dense_run, args.out, args.experts, args.top_k, args.moe_every, args.router_std, args.seed)
    counts = count_parameters(model)
    print(f"wrote run directory {args.out}: {counts.total:,} parameters, {counts.active:,} active per token")
    if args.json:
        print_json({"run_dir": str(args.out), "total_params": counts.total, "active_params": counts.active})
    return 0

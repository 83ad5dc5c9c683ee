"""Quantized experts and routing traces on a moekit run: quality figures and trace files.

``run_quality(RUN)``: perplexity change and top-1 agreement of int8 / int4 experts against the
run's own model on held-out text (moekit.inference.quant.quantization_quality).
``record_run_trace(RUN, data, out)``: the routing trace of the run's model over a text
(moekit.inference.trace), its metadata naming the run, its training step and the text.

Held-out text: without ``data``, the validation split of the text the run was trained on (its
last 10% of tokens, which training never sees); with ``data``, that whole file.

Script use (one JSON document on stdout):

    python -m moekit.experiments.quant runs/my [--data FILE] [--max-tokens 16384] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


class RunInputError(ValueError):
    """Bad input (a run directory or text file that cannot be used); the message names it."""


@dataclass
class LoadedRun:
    model: nn.Module
    payload: dict  # config.json of the run
    step: int | None  # training step of its checkpoint, when recorded
    path: Path

    @property
    def trained(self) -> bool:
        return bool(self.step)

    def describe(self) -> str:
        c = self.model.config
        return (
            f"moekit LM {c.n_layer} layers, d_model {c.d_model}, {c.moe.num_experts} experts top-{c.moe.top_k}, "
            f"d_ff {c.moe.d_ff} ({c.moe.activation})"
        )

    def source(self) -> str:
        step = "unknown step" if self.step is None else f"step {self.step}"
        return f"moekit run {self.path} (checkpoint at {step})"


def load_run(run_dir: str | Path, flag: str = "RUN") -> LoadedRun:
    from moekit.training.checkpoint import STATE_FILE, CheckpointError, find_checkpoint, load_model_from_run, load_state

    path = Path(run_dir)
    if not path.is_dir():
        raise RunInputError(f"{flag} {path}: is not a directory (expected a moekit run directory)")
    try:
        model, payload = load_model_from_run(path)
        checkpoint = find_checkpoint(path)
        step = load_state(checkpoint / STATE_FILE).get("step") if (checkpoint / STATE_FILE).exists() else None
    except CheckpointError as error:
        raise RunInputError(f"{flag}: {error}") from error
    return LoadedRun(model.eval(), payload, step, path)


def held_out_tokens(run: LoadedRun, data: str | Path | None, flag: str = "--data") -> tuple[Tensor, str]:
    """Token ids [T] of the held-out text and a description of where they come from."""
    from moekit.training.data import TRAIN_FRACTION, DataError, read_text, tokenizer_from_dict

    tokenizer = tokenizer_from_dict(run.payload.get("tokenizer", {"kind": "bytes"}))
    train_data = run.payload.get("train", {}).get("data")
    try:
        text, file = read_text(data if data is not None else train_data)
    except DataError as error:
        raise RunInputError(f"{flag}: {error}") from error
    tokens_T = tokenizer.encode_tensor(text).long()
    if data is None:
        split = int(TRAIN_FRACTION * tokens_T.numel())
        return tokens_T[split:], f"validation split (last 10%, {tokens_T.numel() - split} tokens) of {file}"
    return tokens_T, f"{file} ({tokens_T.numel()} tokens)"


def windows(tokens_T: Tensor, seq_len: int, max_tokens: int, batch_size: int = 8) -> list[Tensor]:
    """Consecutive, non-overlapping windows [B, seq_len + 1] covering at most ``max_tokens``
    predicted tokens (each window's last token is the next window's first input)."""
    count = min(max_tokens // seq_len, (tokens_T.numel() - 1) // seq_len)
    if count < 1:
        raise RunInputError(f"--data: {tokens_T.numel()} held-out tokens; need at least {seq_len + 1}")
    starts = torch.arange(count) * seq_len
    rows = tokens_T[starts[:, None] + torch.arange(seq_len + 1)[None, :]]
    return [rows[i : i + batch_size] for i in range(0, count, batch_size)]


def run_quality(
    run_dir: str | Path,
    data: str | Path | None = None,
    max_tokens: int = 16384,
    schemes: tuple[str, ...] = ("int8", "int4"),
    dtype: str = "float32",
) -> dict:
    """The quality of int8 / int4 experts on a run's model, as one JSON-able document. With
    ``dtype="bfloat16"`` the reference is the model cast to bf16, and the quantized experts
    run their kernels with bf16 activations."""
    from moekit.inference.quant import kernel_status, quantization_quality

    if dtype not in ("float32", "bfloat16"):
        raise RunInputError(f"--dtype {dtype} is invalid: use float32 or bfloat16")
    run = load_run(run_dir)
    run.model.to(getattr(torch, dtype))
    tokens_T, text = held_out_tokens(run, data)
    batches = windows(tokens_T, run.model.config.seq_len, max_tokens)
    reports = quantization_quality(run.model, batches, schemes)
    return {
        "model": run.describe(),
        "source": run.source(),
        "trained": run.trained,
        "text": text,
        "tokens": reports[0].tokens if reports else 0,
        "dtype": dtype,
        "kernels": kernel_status(),
        "threads": torch.get_num_threads(),
        "results": [report.to_dict() for report in reports],
    }


def record_run_trace(
    run_dir: str | Path, data: str | Path | None, out: str | Path, max_tokens: int = 4096
) -> tuple[Path, dict]:
    """Record the routing of a run's model over ``max_tokens`` held-out tokens (windows of its
    seq_len, batch 1) into ``out``; returns the file and its metadata."""
    from moekit.inference.trace import record_trace

    run = load_run(run_dir)
    tokens_T, text = held_out_tokens(run, data)
    tokens_T = tokens_T[:max_tokens]
    trace = record_trace(
        run.model, tokens_T, run.model.config.seq_len, source=run.source(), trained=run.trained,
        model_name=run.describe(), text=f"first {tokens_T.numel()} tokens of the {text}",
        extra={"model_config": run.payload["model"]},
    )
    path = trace.save(out)
    return path, trace.metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moekit.experiments.quant",
        description="Perplexity change and top-1 agreement of int8/int4 experts vs the run's own model (JSON).",
    )
    parser.add_argument("run", metavar="RUN", help="moekit run directory")
    parser.add_argument(
        "--data", default=None, metavar="FILE", help="held-out text (default: the run's validation split)"
    )
    parser.add_argument("--max-tokens", type=int, default=16384, metavar="N", help="tokens compared (default 16384)")
    parser.add_argument("--dtype", default="float32", metavar="DTYPE", help="float32 (default) or bfloat16")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        print(f"error: --max-tokens {args.max_tokens} is invalid: must be >= 1", file=sys.stderr)
        return 2
    try:
        result = run_quality(args.run, args.data, args.max_tokens, dtype=args.dtype)
    except RunInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0

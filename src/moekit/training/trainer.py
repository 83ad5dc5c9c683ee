"""Train an MoE (or dense baseline) language model on a text file.

    moekit train                                   # small MoE on tiny Shakespeare, ~5 min on 2 CPU cores
    moekit train --data my.txt --experts 16 --top-k 2 --out runs/my
    moekit train --arch dense --out runs/dense     # the equal-active-compute dense baseline
    moekit train --resume runs/my --steps 4000     # continue exactly where it stopped
    python -m moekit train --json                  # last line: one JSON object of results
    torchrun --nproc_per_node 4 -m moekit train --expert-parallel 4 --out runs/ep4
                                                   # experts sharded over 4 ranks (moekit.distributed.run)

The run directory holds config.json, checkpoint/ (model.safetensors and state.pt with the
optimizer, schedule position, data sampler and RNG states), metrics.csv, TensorBoard events
when tensorboard is installed, and PNG plots (loss, expert load per layer, dropped tokens).

Training: AdamW, linear warmup then cosine decay, gradient clipping, gradient accumulation,
the MoE auxiliary losses through ``moekit.aux_loss``, the aux-loss-free bias update once per
optimizer step, optional bf16 autocast. Checkpoints are written to a temporary directory and
renamed into place, so a crash never leaves a half-written checkpoint; Ctrl-C saves one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moekit.distributed.run import DistributedRun
from moekit.layer import aux_loss, moe_layers, routing_stats, update_expert_bias
from moekit.models.cost import count_parameters
from moekit.models.lm import LMConfig, MoETransformerLM
from moekit.training.checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    STATE_FILE,
    CheckpointError,
    find_checkpoint,
    load_state,
    load_weights,
    read_run_config,
    save_checkpoint,
    write_json_atomic,
    write_metrics_csv,
)
from moekit.training.config import TrainConfig
from moekit.training.data import (
    BPETokenizer,
    ByteTokenizer,
    TextDataset,
    eval_batches,
    random_batch,
    tokenizer_from_dict,
)

CALIBRATION_STEPS = (10, 50)  # steps timed to fit a max_minutes run's schedule to the machine


def lr_at(step: int, config: TrainConfig, total_steps: int | None = None) -> float:
    """Linear warmup to lr, then cosine decay to lr · min_lr_ratio at ``total_steps``.

    ``total_steps`` is config.steps, or fewer when ``max_minutes`` would end the run first:
    the trainer times steps 10 to 50 and fixes the schedule's length once (saved in the
    checkpoint), so a time-limited run still ends on a decayed rate and resumes exactly.
    """
    total_steps = config.steps if total_steps is None else total_steps
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen (fine-tuning with --freeze): no optimizer state
        # NOTE: norms' gains and the router projection are not decayed: decay pulls router
        # logits toward uniform, which fights the balance the router is learning.
        (decay if param.dim() >= 2 and "router" not in name else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # NOTE: the fused kernel updates all parameters in one pass: on CPU it takes 4 ms per step for
    # the default MoE (6.6M parameters) where the foreach implementation takes 19 ms.
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.beta2), fused=True)


def optimizer_step(
    model: MoETransformerLM,
    optimizer: torch.optim.Optimizer,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    ranks: DistributedRun | None = None,
) -> tuple[float, float]:
    """One optimizer step: ``grad_accum`` micro-batches (forward, aux losses, backward), the
    gradient mean over ranks, clipping, AdamW, then the aux-free bias update. Returns the
    step's mean LM loss and aux loss."""
    ranks = ranks or DistributedRun.single()
    step_loss, step_aux = 0.0, 0.0
    for _ in range(config.grad_accum):
        inputs, targets = next_batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            _, loss = model(inputs, targets)
            auxiliary = aux_loss(model)
        ((loss + auxiliary) / config.grad_accum).backward()
        step_loss += loss.item() / config.grad_accum
        step_aux += float(auxiliary.detach()) / config.grad_accum
    ranks.reduce_gradients(model)
    if config.grad_clip > 0:
        ranks.clip_grad_norm_(model, config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ranks.pool_router_load(model)
    update_expert_bias(model)
    return step_loss, step_aux


def print0(*args: Any, **kwargs: Any) -> None:
    """Print from rank 0 only (every process is rank 0 outside torch.distributed)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        print(*args, **kwargs)
    elif torch.distributed.get_rank() == 0:
        print(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    train_loss: float
    val_loss: float
    bits_per_byte: float
    tokens_per_s: float
    train_seconds: float
    total_params: int
    active_params: int
    load_imbalance: float | None
    dropped_fraction: float | None
    plots: list[str]
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _NullWriter:
    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard_writer(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard missing or broken: log nothing
        return _NullWriter()
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


@torch.no_grad()
def evaluate(model: MoETransformerLM, batches: list, bf16: bool) -> float:
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(inputs, targets)
        total += loss.item() * inputs.numel()
        count += inputs.numel()
    model.train()
    return total / count


def _layer_summaries(model: torch.nn.Module) -> tuple[float | None, float | None, list[list[float]]]:
    stats = routing_stats(model)
    if not stats:
        return None, None, []
    loads = []
    for layer in stats.values():
        total = sum(layer.tokens_per_expert) or 1
        loads.append([count / total for count in layer.tokens_per_expert])
    imbalance = sum(s.load_imbalance for s in stats.values()) / len(stats)
    dropped = sum(s.dropped_fraction for s in stats.values()) / len(stats)
    return imbalance, dropped, loads


def train(
    model_config: LMConfig,
    train_config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
    expert_parallel: int = 1,
) -> TrainResult:
    """Train (or, with ``resume``, continue) the run in ``out``; returns its figures.

    ``expert_parallel`` > 1: launched by torchrun on that many ranks, experts sharded over
    them, the rest data-parallel (see ``moekit.distributed.run``); a checkpoint written by
    any number of ranks resumes on any other.
    """
    train_config.validate()
    ranks = DistributedRun.setup(expert_parallel)
    try:
        return _train(model_config, train_config, Path(out), resume, progress, on_step, ranks)
    finally:
        ranks.close()


def _train(
    model_config: LMConfig,
    train_config: TrainConfig,
    run_dir: Path,
    resume: bool,
    progress: bool,
    on_step: Callable[[int, dict], None] | None,
    ranks: DistributedRun,
) -> TrainResult:
    if resume:
        # The run's own configs rule; only the number of steps may be changed (extended).
        payload = read_run_config(run_dir)
        model_config = LMConfig.from_dict(payload["model"])
        steps = train_config.steps
        train_config = TrainConfig.from_dict(payload["train"])
        steps_changed = steps != train_config.steps
        train_config.steps = steps
        tokenizer = tokenizer_from_dict(payload.get("tokenizer", {"kind": "bytes"}))
        if payload["train"].get("steps") != steps and ranks.is_main:
            payload["train"]["steps"] = steps
            write_json_atomic(run_dir / CONFIG_FILE, payload)
    else:
        if (run_dir / CONFIG_FILE).exists() or (run_dir / CHECKPOINT_DIR).exists():
            raise CheckpointError(
                f"{run_dir / CONFIG_FILE}: {run_dir} already holds a run; pass --resume {run_dir} "
                "to continue it, or choose another --out (nothing was overwritten)"
            )
        tokenizer = ByteTokenizer()
        ranks.barrier()  # every rank has checked the directory before rank 0 writes into it

    if train_config.tokenizer == "bpe" and not resume:
        from moekit.training.data import read_text

        text, _ = read_text(train_config.data)
        tokenizer = BPETokenizer.train(text, train_config.bpe_vocab_size)
    if model_config.vocab_size != tokenizer.vocab_size:
        model_config = LMConfig.from_dict({**model_config.to_dict(), "vocab_size": tokenizer.vocab_size})
    dataset = TextDataset.load(train_config.data, model_config.seq_len, tokenizer)

    torch.manual_seed(train_config.seed)
    model = MoETransformerLM(model_config)
    counts = count_parameters(model)
    ranks.shard(model)
    if ranks.distributed:
        torch.manual_seed(ranks.data_seed(train_config.seed))  # routing noise differs per rank
    optimizer = build_optimizer(model, train_config)
    sampler = torch.Generator().manual_seed(ranks.data_seed(train_config.seed))
    history: list[dict] = []
    step = 0
    train_seconds = 0.0
    tokens_seen = 0
    window = [0.0, 0, 0.0]  # train loss, tokens and seconds since the last log row
    total_steps = train_config.steps
    calibrated = train_config.max_minutes is None
    calibration_start = 0.0
    if resume:
        checkpoint = find_checkpoint(run_dir)
        ranks.load_weights(model, checkpoint, load_weights)
        state = ranks.load_state(model, optimizer, checkpoint, load_state)
        try:
            optimizer.load_state_dict(state["optimizer"])
            sampler.set_state(state["sampler"])
            torch.set_rng_state(state["torch_rng"])
            step = state["step"]
            history = state["history"]
            train_seconds = state["train_seconds"]
            tokens_seen = state["tokens_seen"]
            window = state["window"]
            if not steps_changed:
                total_steps = state["total_steps"]
                calibrated = state["calibrated"]
                calibration_start = state["calibration_start"]
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise CheckpointError(f"{checkpoint / STATE_FILE}: does not match this run ({error})") from error
    elif ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            run_dir / CONFIG_FILE,
            {
                "model": model_config.to_dict(),
                "train": asdict(train_config),
                "tokenizer": tokenizer.to_dict(),
            },
        )

    val_batches = eval_batches(
        dataset.val_tokens, train_config.batch_size, model_config.seq_len, train_config.eval_batches
    )
    writer = _tensorboard_writer(run_dir) if ranks.is_main else _NullWriter()
    model.train()

    def state_dict() -> dict:
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": {
                "step": step,
                "warmup_steps": train_config.warmup_steps,
                "steps": total_steps,
            },
            "sampler": sampler.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "history": history,
            "train_seconds": train_seconds,
            "tokens_seen": tokens_seen,
            "window": [window_loss, window_tokens, window_seconds],
            "total_steps": total_steps,
            "calibrated": calibrated,
            "calibration_start": calibration_start,
        }

    bar = tqdm(
        total=total_steps, initial=step, disable=not (progress and ranks.is_main), dynamic_ncols=True, desc="train"
    )
    interrupted = False
    last_train_loss = float("nan")
    window_loss, window_tokens, window_seconds = window
    # Every rank trains on its own batches: the step covers all ranks' tokens.
    tokens_per_step = train_config.batch_size * train_config.grad_accum * model_config.seq_len * ranks.num_ranks
    try:
        while step < total_steps:
            started = time.perf_counter()
            lr = lr_at(step, train_config, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss, step_aux = optimizer_step(
                model,
                optimizer,
                lambda: random_batch(dataset.train_tokens, train_config.batch_size, model_config.seq_len, sampler),
                train_config,
                ranks,
            )
            elapsed = time.perf_counter() - started
            # Means over the ranks: every rank then makes the same time-budget decisions.
            step_loss, step_aux, elapsed = ranks.mean([step_loss, step_aux, elapsed])
            step += 1
            train_seconds += elapsed
            tokens_seen += tokens_per_step
            last_train_loss = step_loss
            window_loss += step_loss
            window_tokens += tokens_per_step
            window_seconds += elapsed
            bar.update(1)

            if not calibrated and step == CALIBRATION_STEPS[0]:
                calibration_start = train_seconds
            if not calibrated and step == CALIBRATION_STEPS[1]:
                seconds_per_step = (train_seconds - calibration_start) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0])
                budget = 60 * train_config.max_minutes - train_seconds  # type: ignore[operator]
                total_steps = min(total_steps, step + max(1, int(budget / seconds_per_step)))
                calibrated = True
                bar.total = total_steps
            is_eval = step % train_config.eval_interval == 0 or step == total_steps
            if step % train_config.log_interval == 0 or is_eval:
                imbalance, dropped, loads = _layer_summaries(model)
                row: dict[str, Any] = {
                    "step": step,
                    "train_loss": window_loss / max(1, window_tokens // tokens_per_step),
                    "aux_loss": step_aux,
                    "lr": lr,
                    "tokens_per_s": window_tokens / window_seconds if window_seconds else 0.0,
                    "load_imbalance": imbalance,
                    "dropped_fraction": dropped,
                    "train_seconds": train_seconds,
                    "expert_load": loads,
                }
                if is_eval:
                    row["val_loss"] = evaluate(model, val_batches, train_config.bf16)
                history.append(row)
                for key in ("train_loss", "val_loss", "aux_loss", "tokens_per_s", "load_imbalance", "lr"):
                    if row.get(key) is not None:
                        writer.add_scalar(key, row[key], step)
                postfix = {"loss": f"{row['train_loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
                if imbalance is not None:
                    postfix["imbalance"] = f"{imbalance:.2f}"
                if "val_loss" in row:
                    postfix["val"] = f"{row['val_loss']:.3f}"
                bar.set_postfix(postfix)
                if on_step is not None and ranks.is_main:
                    on_step(step, row)
                window_loss, window_tokens, window_seconds = 0.0, 0, 0.0
            if step % train_config.checkpoint_interval == 0 and step < total_steps:
                ranks.save_checkpoint(run_dir, model, state_dict(), save_checkpoint)
                if ranks.is_main:
                    write_metrics_csv(run_dir, history)
            if train_config.max_minutes is not None and train_seconds >= 60 * train_config.max_minutes:
                break
    except KeyboardInterrupt:
        interrupted = True
        bar.write(f"interrupted at step {step}: saving a checkpoint to {run_dir / CHECKPOINT_DIR}")
    finally:
        bar.close()
        writer.close()
    if step > 0 and not (history and history[-1]["step"] == step and "val_loss" in history[-1]):
        # Stopped off the evaluation grid (time limit, Ctrl-C): evaluate where it stopped.
        imbalance, dropped, loads = _layer_summaries(model)
        history.append({
            "step": step, "train_loss": last_train_loss, "lr": lr_at(step, train_config, total_steps),
            "load_imbalance": imbalance, "dropped_fraction": dropped, "train_seconds": train_seconds,
            "expert_load": loads, "val_loss": evaluate(model, val_batches, train_config.bf16),
        })  # fmt: skip
    ranks.save_checkpoint(run_dir, model, state_dict(), save_checkpoint)
    plots: list[str] = []
    if ranks.is_main:
        write_metrics_csv(run_dir, history)
        from moekit.training.plots import plot_run

        plots = [str(p) for p in plot_run(run_dir, history, [name for name, _ in moe_layers(model)])]
    val_rows = [row for row in history if "val_loss" in row]
    val_loss = val_rows[-1]["val_loss"] if val_rows else evaluate(model, val_batches, train_config.bf16)
    last_imbalance = next((r["load_imbalance"] for r in reversed(history) if r.get("load_imbalance") is not None), None)
    last_dropped = next(
        (r["dropped_fraction"] for r in reversed(history) if r.get("dropped_fraction") is not None), None
    )
    result = TrainResult(
        run_dir=str(run_dir),
        steps=step,
        train_loss=last_train_loss,
        val_loss=val_loss,
        bits_per_byte=val_loss / math.log(2) / dataset.bytes_per_token,
        tokens_per_s=tokens_seen / train_seconds if train_seconds else 0.0,
        train_seconds=train_seconds,
        total_params=counts.total,
        active_params=counts.active,
        load_imbalance=last_imbalance,
        dropped_fraction=last_dropped,
        plots=plots,
        interrupted=interrupted,
    )
    if ranks.is_main:
        write_json_atomic(run_dir / "results.json", result.to_dict())
    return result

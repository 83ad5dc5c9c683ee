"""Training speed of experiment (g)'s models, measured in one process, alternating.

The grid's own run times (``train min`` in results_g.md) come from runs trained two at a time
on a shared machine, so they carry the other run's load. Here every model trains with the
trainer's own step (``Trainer.train_step``: batch draw, forward, backward, clipping, AdamW) on
the same facts text, in one process with the threads a grid worker has, in rounds that visit
the models in turn (the order rotated every round), so that drifts of the machine's speed
fall on all of them alike. Each round's time per step of a model is compared with the dense
model's in the same round; the median over rounds is the figure.

The figures serve two purposes: the issue's throughput target (an MoE trains at ≥ 0.9x the
dense model's tokens/s) and the dense model's steps at equal wall time (``equal_time_steps``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from moekit.models.lm import LMConfig, MoETransformerLM
from moekit.training.config import TrainConfig
from moekit.training.data import ByteTokenizer, TextDataset
from moekit.training.trainer import StopSignals, Trainer, TrainState


def seconds_per_step(
    models: dict[str, LMConfig],
    train: TrainConfig,
    rounds: int = 7,
    steps_per_round: int = 20,
    warmup_steps: int = 10,
    threads: int = 1,
) -> dict[str, list[float]]:
    """Per model, its seconds per training step in each round (``rounds`` values)."""
    if rounds < 1 or steps_per_round < 1 or warmup_steps < 0:
        raise ValueError(f"rounds={rounds}, steps_per_round={steps_per_round} must be >= 1, "
                         f"warmup_steps={warmup_steps} >= 0")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    # No evaluation or log row inside the measured steps: intervals past the last step.
    never = 10**9
    train = replace(train, log_interval=never, eval_interval=never, checkpoint_interval=never)
    trainers: dict[str, Trainer] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="moekit-speed-") as scratch:
            for name, model_config in models.items():
                dataset = TextDataset.load(train.data, model_config.seq_len, ByteTokenizer())
                torch.manual_seed(train.seed)
                state = TrainState(sampler=torch.Generator().manual_seed(train.seed), total_steps=never)
                trainer = Trainer(MoETransformerLM(model_config), train, dataset, Path(scratch) / name, state,
                                  StopSignals(), progress=False)
                trainer._bar = None  # fit() sets it; train_step's log reads it
                trainer.model.train()
                for _ in range(warmup_steps):
                    trainer.train_step()
                trainers[name] = trainer
            times: dict[str, list[float]] = {name: [] for name in models}
            names = list(models)
            for round_index in range(rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    trainer = trainers[name]
                    started = time.perf_counter()
                    for _ in range(steps_per_round):
                        trainer.train_step()
                    times[name].append((time.perf_counter() - started) / steps_per_round)
    finally:
        torch.set_num_threads(previous_threads)
    return times


def throughput_ratios(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Per model: the median over rounds of (baseline's seconds per step / its own) in the same
    round, i.e. its tokens/s relative to the baseline's, with the lowest and highest round."""
    ratios = {}
    for name, values in times.items():
        per_round = [b / v for b, v in zip(times[baseline], values, strict=True)]
        ratios[name] = {
            "ratio": statistics.median(per_round),
            "min": min(per_round),
            "max": max(per_round),
            "seconds_per_step": statistics.median(values),
        }
    return ratios


def equal_time_steps(steps: int, ratio: float, multiple: int = 100) -> int:
    """The dense model's steps in the wall time of ``steps`` steps of a model that trains at
    ``ratio`` times the dense model's speed: steps / ratio, rounded to a multiple of ``multiple``
    (so that a rerun on a machine of slightly different speed reuses the runs)."""
    if not ratio > 0:
        raise ValueError(f"ratio={ratio} must be > 0")
    return max(multiple, int(round(steps / ratio / multiple)) * multiple)

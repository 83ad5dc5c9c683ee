"""``moekit compare``: the MoE literature's claims, reproduced as short trainings.

    moekit compare --out runs/compare            # the whole grid, results.md + PNGs
    moekit compare --experiments a,d --seeds 2   # a subset
    moekit compare --quick                       # a tiny grid: checks the pipeline

Experiment (a) trains the default ``moekit train`` model and recipe (context 128, batch 16);
(b)-(e) train it at context 64 and batch 8 for a few hundred steps, so that a grid of dozens of
runs fits in about half an hour; runs differ only in the setting under study.
  a  MoE vs the dense baseline of equal active compute: at equal steps, at equal wall time
     (the dense run gets the MoE run's training time), and training throughput measured in
     one process, the two models alternating step by step
  b  top-1 (Switch) vs top-2 routing
  c  capacity factor 1.0 / 1.25 / 2.0 / dropless: dropped fraction and validation loss
  d  balance loss on vs off: load imbalance (max/mean tokens per expert) over training
  e  the routers side by side
  f  a control for (a): does FFN capacity limit this model at all? The dense baseline at 2x and
     4x its FFN width (so 2x and 4x the FFN compute), same recipe and steps as (a). An MoE adds
     FFN parameters at constant compute; where wider dense FFNs do not lower the validation
     loss either, the MoE has nothing to gain from them.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moekit.models.lm import LMConfig, MoETransformerLM
from moekit.training.config import TrainConfig, default_configs
from moekit.training.data import ByteTokenizer, TextDataset, random_batch
from moekit.training.trainer import build_optimizer, optimizer_step, train

EXPERIMENTS = ("a", "b", "c", "d", "e", "f")
FFN_WIDTH_FACTORS = (2, 4)  # experiment (f): dense FFN widths, in multiples of the matched width
COMPARE_SEQ_LEN = 64
COMPARE_BATCH_SIZE = 8
SEEDS_PER_SIDE_EXPERIMENT = 2  # seeds for experiments b-e (a and f use all --seeds)
THROUGHPUT_ROUNDS = 7
THROUGHPUT_STEPS_PER_ROUND = 4


@dataclass
class RunSpec:
    name: str  # setting, e.g. "moe-top2"
    seed: int
    model: LMConfig
    train: TrainConfig

    @property
    def key(self) -> str:
        return f"{self.name}-s{self.seed}"


def _with_moe(model: LMConfig, **moe_values: Any) -> LMConfig:
    return replace(model, moe=replace(model.moe, **moe_values))


def _fixed_steps(train_config: TrainConfig, steps: int) -> TrainConfig:
    return replace(
        train_config,
        steps=steps,
        warmup_steps=min(train_config.warmup_steps, max(1, steps // 10)),
        eval_interval=max(1, steps // 8),
        checkpoint_interval=10**9,
        log_interval=10,
        max_minutes=None,
    )


def headline_configs(steps: int, quick: bool) -> tuple[LMConfig, TrainConfig]:
    """Experiment (a): the default ``moekit train`` model and recipe, for a fixed number of steps."""
    model, train_config = default_configs()
    train_config = _fixed_steps(train_config, steps)
    if quick:
        return _quick(model, train_config)
    return model, train_config


def side_configs(steps: int, quick: bool) -> tuple[LMConfig, TrainConfig]:
    """Experiments (b)-(e): the default model at a shorter context and a smaller batch."""
    model, train_config = default_configs()
    # NOTE: so that a grid of dozens of runs fits in about half an hour on a CPU.
    model = replace(model, seq_len=COMPARE_SEQ_LEN)
    train_config = replace(_fixed_steps(train_config, steps), batch_size=COMPARE_BATCH_SIZE)
    if quick:
        return _quick(model, train_config)
    return model, train_config


def _quick(model: LMConfig, train_config: TrainConfig) -> tuple[LMConfig, TrainConfig]:
    model = replace(model, d_model=32, n_layer=2, n_head=2, seq_len=32, moe=replace(model.moe, d_model=32, d_ff=32))
    return model, replace(train_config, batch_size=4, eval_batches=2, log_interval=2)


def plan_runs(
    experiments: list[str], seeds: int, steps: int, quick: bool, headline_steps: int | None = None
) -> list[RunSpec]:
    """The settings each experiment needs; a setting shared by experiments runs once."""
    settings: dict[str, tuple[LMConfig, TrainConfig]] = {}
    if "a" in experiments or "f" in experiments:
        model, train_config = headline_configs(headline_steps or steps, quick)
        settings["moe"] = (model, train_config)
        settings["dense"] = (model.as_dense(), train_config)
    if "f" in experiments:
        for factor in FFN_WIDTH_FACTORS:
            # The dense baseline's FFN width is derived from the MoE config (k · d_ff + router
            # share); scaling d_ff scales that width by about the same factor.
            wider = _with_moe(model, d_ff=factor * model.moe.d_ff).as_dense()
            settings[f"dense-ffn-{factor}x"] = (wider, train_config)
    model, train_config = side_configs(steps, quick)
    if any(name in experiments for name in "bcde"):
        settings["moe-top2"] = (model, train_config)
    if "b" in experiments or "e" in experiments:
        settings["switch-top1"] = (_with_moe(model, router="switch", top_k=1), train_config)
    if "c" in experiments:
        for factor in (1.0, 1.25, 2.0):
            settings[f"capacity-{factor}"] = (_with_moe(model, capacity_factor=factor), train_config)
    if "d" in experiments:
        settings["no-balance-loss"] = (_with_moe(model, balance_loss_coef=0.0), train_config)
    if "e" in experiments:
        settings["gshard"] = (_with_moe(model, router="gshard", capacity_factor=2.0), train_config)
        settings["noisy-topk"] = (_with_moe(model, router="noisy_topk"), train_config)
        settings["expert-choice"] = (_with_moe(model, router="expert_choice", capacity_factor=1.0), train_config)
        settings["aux-free"] = (_with_moe(model, router="aux_free", balance_loss_coef=0.0), train_config)
    # (a) is the claim that needs the seed spread, and (f) its control: they get every seed; the
    # other settings get up to two, which is enough to see the differences they show.
    headline = {"moe", "dense", *(f"dense-ffn-{factor}x" for factor in FFN_WIDTH_FACTORS)}
    runs = []
    for seed in range(seeds):
        for name, (config, run_train) in settings.items():
            if name in headline or seed < SEEDS_PER_SIDE_EXPERIMENT:
                runs.append(RunSpec(name, seed, config, replace(run_train, seed=1000 + seed)))
    return runs


def run_compare(
    out: str | Path,
    experiments: list[str] | None = None,
    seeds: int = 3,
    steps: int = 1000,
    quick: bool = False,
    command: str = "moekit compare",
    headline_steps: int | None = None,
) -> dict[str, Any]:
    experiments = list(experiments or EXPERIMENTS)
    unknown = sorted(set(experiments) - set(EXPERIMENTS))
    if unknown:
        raise ValueError(f"--experiments {','.join(unknown)} is invalid: choose from {','.join(EXPERIMENTS)}")
    if seeds < 1 or steps < 1 or (headline_steps is not None and headline_steps < 1):
        raise ValueError(f"--seeds {seeds}, --steps {steps} and --steps-a {headline_steps} must be >= 1")
    headline_steps = headline_steps or steps
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(experiments, seeds, steps, quick, headline_steps)
    results: dict[str, list[dict]] = {}
    started = time.time()
    for spec in tqdm(runs, desc="compare", unit="run", dynamic_ncols=True):
        torch.manual_seed(spec.train.seed)
        result = _run_one(out / "runs" / spec.key, spec)
        results.setdefault(spec.name, []).append(result)
        if spec.name == "moe" and "a" in experiments:
            # Equal wall time: the dense baseline trains for as long as this MoE run took, right
            # after it, so that both see the same machine.
            timed = RunSpec(
                "dense-equal-time",
                spec.seed,
                spec.model.as_dense(),
                replace(spec.train, steps=10 * spec.train.steps, max_minutes=result["train_seconds"] / 60),
            )
            results.setdefault(timed.name, []).append(_run_one(out / "runs" / timed.key, timed))
    throughput = None
    if "a" in experiments:
        model, train_config = headline_configs(headline_steps, quick)
        rounds, steps_per_round = (2, 1) if quick else (THROUGHPUT_ROUNDS, THROUGHPUT_STEPS_PER_ROUND)
        throughput = measure_throughput(
            {"moe": model, "dense": model.as_dense()}, train_config, "dense", rounds, steps_per_round
        )
    summary = summarize(results)
    if throughput is not None:
        summary["throughput"] = throughput
    from moekit.experiments.compare.report import write_report

    write_report(out, experiments, results, summary, command, time.time() - started, steps, seeds, headline_steps)
    return summary


def measure_throughput(
    models: dict[str, LMConfig],
    train_config: TrainConfig,
    baseline: str,
    rounds: int = THROUGHPUT_ROUNDS,
    steps_per_round: int = THROUGHPUT_STEPS_PER_ROUND,
) -> dict[str, Any]:
    """Training tokens/s of each model in one process, the models alternating round by round.

    Separate runs are timed minutes apart, so anything else on the machine lands on one of
    them; alternating short rounds (as DESIGN.md's benchmarks do) exposes every model to the
    same conditions. Each round times ``steps_per_round`` full optimizer steps of each model
    (forward, aux losses, backward, clipping, AdamW, bias update); the ratio to ``baseline`` is
    the median of the per-round ratios.
    """
    if baseline not in models:
        raise ValueError(f"baseline={baseline!r} is not one of the models {sorted(models)}")
    seq_len = next(iter(models.values())).seq_len
    dataset = TextDataset.load(train_config.data, seq_len, ByteTokenizer())
    sampler = torch.Generator().manual_seed(train_config.seed)
    trainers = {}
    for name, config in models.items():
        torch.manual_seed(train_config.seed)
        model = MoETransformerLM(config).train()
        trainers[name] = (model, build_optimizer(model, train_config))

    def timed_steps(model: MoETransformerLM, optimizer: torch.optim.Optimizer, count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            optimizer_step(
                model,
                optimizer,
                lambda: random_batch(dataset.train_tokens, train_config.batch_size, seq_len, sampler),
                train_config,
            )
        return time.perf_counter() - started

    for model, optimizer in trainers.values():
        timed_steps(model, optimizer, 2)  # warm-up: first-call allocations and kernel selection
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in tqdm(range(rounds), desc="throughput", unit="round", dynamic_ncols=True, leave=False):
        for name, (model, optimizer) in trainers.items():
            seconds[name].append(timed_steps(model, optimizer, steps_per_round))
    tokens_per_round = steps_per_round * train_config.batch_size * train_config.grad_accum * seq_len
    return {
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "tokens_per_s": {name: tokens_per_round / statistics.median(times) for name, times in seconds.items()},
        "ratio_to_baseline": {
            name: statistics.median(b / t for b, t in zip(seconds[baseline], times, strict=True))
            for name, times in seconds.items()
        },
    }


def _run_one(run_dir: Path, spec: RunSpec) -> dict:
    if (run_dir / "results.json").exists():  # finished earlier: reuse (the grid can be resumed)
        result = json.loads((run_dir / "results.json").read_text())
        state = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=False)
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished run: start it again
        result = train(spec.model, spec.train, run_dir, progress=False).to_dict()
        state = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=False)
    history = [{k: v for k, v in row.items() if k != "expert_load"} for row in state["history"]]
    return {**result, "history": history, "seed": spec.seed}


def summarize(results: dict[str, list[dict]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, runs in results.items():
        val = [r["val_loss"] for r in runs]
        summary[name] = {
            "val_loss_mean": statistics.mean(val),
            "val_loss_sd": statistics.stdev(val) if len(val) > 1 else 0.0,
            "val_loss_range": max(val) - min(val),
            "val_losses": val,
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
            "steps": statistics.mean(r["steps"] for r in runs),
            "train_seconds": statistics.mean(r["train_seconds"] for r in runs),
            "load_imbalance": _mean_or_none([r["load_imbalance"] for r in runs]),
            "dropped_fraction": _mean_or_none([r["dropped_fraction"] for r in runs]),
            "total_params": runs[0]["total_params"],
            "active_params": runs[0]["active_params"],
            "seeds": len(runs),
        }
    return summary


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None

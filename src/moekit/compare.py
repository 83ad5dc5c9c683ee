"""``moekit compare``: the MoE literature's claims, reproduced as short trainings.

    moekit compare --out runs/compare            # the whole grid, results.md + PNGs
    moekit compare --experiments a,d --seeds 2   # a subset
    moekit compare --quick                       # a tiny grid: checks the pipeline

Experiments (every run is the default ``moekit train`` model at context 64 and batch 8 for a
few hundred steps, so runs differ only in the setting under study):
  a  MoE vs the dense baseline of equal active compute: at equal steps, and at equal wall
     time (the dense run gets the MoE run's training time)
  b  top-1 (Switch) vs top-2 routing
  c  capacity factor 1.0 / 1.25 / 2.0 / dropless: dropped fraction and validation loss
  d  balance loss on vs off: load imbalance (max/mean tokens per expert) over training
  e  the routers side by side
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

from moekit.models.lm import LMConfig
from moekit.train import TrainConfig, default_configs, train

EXPERIMENTS = ("a", "b", "c", "d", "e")
COMPARE_SEQ_LEN = 64
COMPARE_BATCH_SIZE = 8
SEEDS_PER_SIDE_EXPERIMENT = 2  # seeds for experiments b-e (a uses all --seeds)


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


def plan_runs(experiments: list[str], seeds: int, steps: int, quick: bool) -> list[RunSpec]:
    """The settings each experiment needs; a setting shared by experiments runs once."""
    model, train_config = default_configs()
    # NOTE: the default model at a shorter context and smaller batch, so that a grid of
    # dozens of runs fits in minutes on a CPU; runs differ only in the setting under study.
    model = replace(model, seq_len=COMPARE_SEQ_LEN)
    train_config = replace(
        train_config,
        steps=steps,
        batch_size=COMPARE_BATCH_SIZE,
        warmup_steps=min(train_config.warmup_steps, max(1, steps // 10)),
        eval_interval=max(1, steps // 8),
        checkpoint_interval=10**9,
        log_interval=10,
        max_minutes=None,
    )
    if quick:
        model = replace(model, d_model=32, n_layer=2, n_head=2, seq_len=32, moe=replace(model.moe, d_model=32, d_ff=32))
        train_config = replace(train_config, batch_size=4, eval_batches=2, log_interval=2)
    settings: dict[str, LMConfig] = {"moe-top2": model}
    if "a" in experiments:
        settings["dense"] = model.as_dense()
    if "b" in experiments or "e" in experiments:
        settings["switch-top1"] = _with_moe(model, router="switch", top_k=1)
    if "c" in experiments:
        for factor in (1.0, 1.25, 2.0):
            settings[f"capacity-{factor}"] = _with_moe(model, capacity_factor=factor)
    if "d" in experiments:
        settings["no-balance-loss"] = _with_moe(model, balance_loss_coef=0.0)
    if "e" in experiments:
        settings["gshard"] = _with_moe(model, router="gshard", capacity_factor=2.0)
        settings["noisy-topk"] = _with_moe(model, router="noisy_topk")
        settings["expert-choice"] = _with_moe(model, router="expert_choice", capacity_factor=1.0)
        settings["aux-free"] = _with_moe(model, router="aux_free", balance_loss_coef=0.0)
    # (a) is the claim that needs the seed spread: it gets every seed; the other settings get
    # up to two, which is enough to see the differences they show.
    headline = {"moe-top2", "dense"}
    runs = []
    for seed in range(seeds):
        for name, config in settings.items():
            if name in headline or seed < SEEDS_PER_SIDE_EXPERIMENT:
                runs.append(RunSpec(name, seed, config, replace(train_config, seed=1000 + seed)))
    return runs


def run_compare(
    out: str | Path,
    experiments: list[str] | None = None,
    seeds: int = 3,
    steps: int = 1000,
    quick: bool = False,
    command: str = "moekit compare",
) -> dict[str, Any]:
    experiments = list(experiments or EXPERIMENTS)
    unknown = sorted(set(experiments) - set(EXPERIMENTS))
    if unknown:
        raise ValueError(f"--experiments {','.join(unknown)} is invalid: choose from {','.join(EXPERIMENTS)}")
    if seeds < 1 or steps < 1:
        raise ValueError(f"--seeds {seeds} and --steps {steps} must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(experiments, seeds, steps, quick)
    results: dict[str, list[dict]] = {}
    started = time.time()
    for spec in tqdm(runs, desc="compare", unit="run", dynamic_ncols=True):
        torch.manual_seed(spec.train.seed)
        result = _run_one(out / "runs" / spec.key, spec)
        results.setdefault(spec.name, []).append(result)
    if "a" in experiments:
        # Equal wall time: the dense baseline trains for as long as the MoE run took.
        for seed in range(seeds):
            moe_seconds = results["moe-top2"][seed]["train_seconds"]
            dense_model = runs[0].model.as_dense()
            spec = RunSpec(
                "dense-equal-time",
                seed,
                dense_model,
                replace(runs[0].train, seed=1000 + seed, steps=10 * steps, max_minutes=moe_seconds / 60,
                        eval_interval=max(1, steps // 8)),
            )  # fmt: skip
            results.setdefault(spec.name, []).append(_run_one(out / "runs" / spec.key, spec))
    summary = summarize(results)
    from moekit.compare_report import write_report

    write_report(out, experiments, results, summary, command, time.time() - started, steps, seeds)
    return summary


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

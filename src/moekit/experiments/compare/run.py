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
  i  the recipe, part by part: the side shape with one part of the stable MoE recipe turned
     back to the naive choice per setting, 5 seeds each: what each part does to the seed
     spread of the validation loss (``recipe.py``)

Runs and reuse: every run lives in ``<out>/runs/<name>-s<seed>-<spec hash>``, the hash taken
over its full specification (every field of the model config and of the train config, and the
training text's SHA-256), which ``spec.json`` in the run directory holds. A run is reused only
when its spec.json matches field by field and its results.json says it ran all its steps, so a
grid with other ``--steps`` or ``--quick`` trains its own runs and never overwrites another's.
Ctrl-C or SIGTERM stops the whole grid (``GridInterrupted``): the run it stopped is trained
again from its start by the next identical command, and no results.md is written from a part
of the grid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moekit.experiments.compare.recipe import (
    RECIPE,
    RECIPE_SEEDS,
    RECIPE_SEEDS_QUICK,
    RECIPE_SETTINGS,
    eval_draw_spread,
    summarize_recipe,
)
from moekit.models.lm import LMConfig, MoETransformerLM
from moekit.training.checkpoint import write_json_atomic
from moekit.training.config import TrainConfig, default_configs
from moekit.training.data import ByteTokenizer, TextDataset, random_batch, read_text
from moekit.training.trainer import build_optimizer, optimizer_step, train

EXPERIMENTS = ("a", "b", "c", "d", "e", "f", "i")
FFN_WIDTH_FACTORS = (2, 4)  # experiment (f): dense FFN widths, in multiples of the matched width
COMPARE_SEQ_LEN = 64
COMPARE_BATCH_SIZE = 8
SEEDS_PER_SIDE_EXPERIMENT = 2  # seeds for experiments b-e (a and f use all --seeds)
THROUGHPUT_ROUNDS = 7
THROUGHPUT_STEPS_PER_ROUND = 4
SPEC_FILE = "spec.json"
SPEC_HASH_CHARS = 12  # hex digits of the spec's SHA-256 in a run directory's name


class GridInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the grid; ``run`` names the run it stopped, if one was training."""

    def __init__(self, run: str | None, run_dir: Path | None, signal_name: str = "SIGINT") -> None:
        self.run, self.run_dir, self.signal_name = run, run_dir, signal_name
        where = f" during run {run} ({run_dir})" if run else ""
        super().__init__(f"interrupted by {signal_name}{where}")


class GridRunError(RuntimeError):
    """A run of the grid cannot be used: it ended before its last step for a reason other than
    an interrupt (it diverged, say), or its directory holds a run of another specification."""


@dataclass
class RunSpec:
    name: str  # setting, e.g. "moe-top2"
    seed: int
    model: LMConfig
    train: TrainConfig

    @property
    def key(self) -> str:
        return f"{self.name}-s{self.seed}"

    def to_dict(self, data_sha256: str) -> dict[str, Any]:
        """Everything that determines the run's result: what spec.json holds, as JSON values."""
        payload = {
            "name": self.name,
            "seed": self.seed,
            "model": self.model.to_dict(),
            "train": asdict(self.train),
            "data_sha256": data_sha256,
        }
        return json.loads(json.dumps(payload))  # tuples become lists, as they come back from disk

    def directory_name(self, data_sha256: str) -> str:
        encoded = json.dumps(self.to_dict(data_sha256), sort_keys=True).encode()
        return f"{self.key}-{hashlib.sha256(encoded).hexdigest()[:SPEC_HASH_CHARS]}"


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
    if "d" in experiments or "i" in experiments:
        settings["no-balance-loss"] = (_with_moe(model, balance_loss_coef=0.0), train_config)
    if "i" in experiments:
        settings["moe-top2"] = (model, train_config)
        # Switch's unscaled init: variance 1/fan_in.
        settings["router-init-1x"] = (replace(model, router_init_std=1 / math.sqrt(model.d_model)), train_config)
        settings["no-z-loss"] = (_with_moe(model, z_loss_coef=0.0), train_config)
        settings["dense-top2"] = (model.as_dense(), train_config)
    if "e" in experiments:
        settings["gshard"] = (_with_moe(model, router="gshard", capacity_factor=2.0), train_config)
        settings["noisy-topk"] = (_with_moe(model, router="noisy_topk"), train_config)
        settings["expert-choice"] = (_with_moe(model, router="expert_choice", capacity_factor=1.0), train_config)
        settings["aux-free"] = (_with_moe(model, router="aux_free", balance_loss_coef=0.0), train_config)
    # (a) is the claim that needs the seed spread, and (f) its control: they get every seed; the
    # other settings get up to two, which is enough to see the differences they show; (i) measures
    # spreads themselves and gets its own number of seeds.
    recipe_seeds = (RECIPE_SEEDS_QUICK if quick else RECIPE_SEEDS) if "i" in experiments else 0
    runs = []
    for seed in range(max(seeds, recipe_seeds)):
        for name, (config, run_train) in settings.items():
            if seed < seeds_of(name, seeds, recipe_seeds):
                runs.append(RunSpec(name, seed, config, replace(run_train, seed=1000 + seed)))
    return runs


HEADLINE = {"moe", "dense", *(f"dense-ffn-{factor}x" for factor in FFN_WIDTH_FACTORS)}


def seeds_of(name: str, seeds: int, recipe_seeds: int) -> int:
    """How many seeds a setting trains: every seed for (a) and (f), up to two for (b)-(e), and
    (i)'s own number for its settings (some of which (b)-(e) share)."""
    own = seeds if name in HEADLINE else min(seeds, SEEDS_PER_SIDE_EXPERIMENT)
    return max(own, recipe_seeds) if name in RECIPE_SETTINGS else own


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
    data_sha256 = {data: _data_sha256(data) for data in {spec.train.data for spec in runs}}
    results: dict[str, list[dict]] = {}
    started = time.time()
    current: RunSpec | None = None

    def run_dir_of(spec: RunSpec) -> Path:
        return out / "runs" / spec.directory_name(data_sha256[spec.train.data])

    def run(spec: RunSpec) -> dict:
        nonlocal current
        current = spec
        torch.manual_seed(spec.train.seed)
        result = _run_one(run_dir_of(spec), spec, data_sha256[spec.train.data])
        results.setdefault(spec.name, []).append(result)
        current = None
        return result

    with _sigterm_as_interrupt() as received:
        try:
            for spec in tqdm(runs, desc="compare", unit="run", dynamic_ncols=True):
                result = run(spec)
                if spec.name == "moe" and "a" in experiments:
                    # Equal wall time: the dense baseline trains for as long as this MoE run
                    # took, right after it, so that both see the same machine.
                    run(equal_time_spec(spec, result["train_seconds"]))
            # (b)-(e) report the seeds they asked for, also where (i) trained more of a setting.
            side_seeds = min(seeds, SEEDS_PER_SIDE_EXPERIMENT)
            reported = {name: [r for r in runs_of if name in HEADLINE or r["seed"] < side_seeds]
                        for name, runs_of in results.items()}
            summary = summarize(reported)
            if "i" in experiments:
                recipe_dirs = [(spec.seed, run_dir_of(spec)) for spec in runs if spec.name == RECIPE]
                summary["recipe"] = summarize_recipe(results, eval_draw_spread(recipe_dirs))
            if "a" in experiments:
                model, train_config = headline_configs(headline_steps, quick)
                rounds, steps_per_round = (2, 1) if quick else (THROUGHPUT_ROUNDS, THROUGHPUT_STEPS_PER_ROUND)
                summary["throughput"] = measure_throughput(
                    {"moe": model, "dense": model.as_dense()}, train_config, "dense", rounds, steps_per_round
                )
            from moekit.experiments.compare.report import write_report

            write_report(
                out, experiments, reported, summary, command, time.time() - started, steps, seeds, headline_steps
            )
        except GridInterrupted as interrupted:  # the trainer caught the signal and saved the run's checkpoint
            if received[0] != "SIGINT":  # SIGTERM arrived outside the trainer's own handler
                raise GridInterrupted(interrupted.run, interrupted.run_dir, received[0]) from None
            raise
        except KeyboardInterrupt:
            # Outside a training loop (setting a run up, the throughput rounds, the report):
            # the trainer catches interrupts only inside its loop.
            raise GridInterrupted(
                current.key if current else None, run_dir_of(current) if current else None, received[0]
            ) from None
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


def equal_time_spec(moe: RunSpec, moe_train_seconds: float) -> RunSpec:
    """Experiment (a)'s dense run at equal wall time: it trains until it has used the MoE run's
    training time (steps is only a bound it never reaches); the one run with a time limit."""
    return RunSpec(
        "dense-equal-time",
        moe.seed,
        moe.model.as_dense(),
        replace(moe.train, steps=10 * moe.train.steps, max_minutes=moe_train_seconds / 60),
    )


def _data_sha256(data: str | None) -> str:
    """The identity of the training text (the built-in corpus when ``data`` is None)."""
    text, _ = read_text(data)
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[list[str]]:
    """Turn SIGTERM into KeyboardInterrupt while the grid runs, so that ``kill`` stops it as
    Ctrl-C does (the trainer saves its checkpoint, the grid stops); yields [the signal's name]."""
    received = ["SIGINT"]
    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can only be set from the main thread
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        received[0] = "SIGTERM"
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def incomplete_reason(result: dict[str, Any], spec: RunSpec) -> str | None:
    """Why a run's results.json does not describe the complete run ``spec`` asks for, or None.

    Complete: not interrupted, stopped by its step count (``stopped_by`` "steps", when the
    trainer wrote it) after exactly ``spec.train.steps`` steps. The equal-time run is the one
    run with a time limit: it may also stop by "max_minutes", before its (unreached) steps.
    """
    steps = result.get("steps")
    stopped_by = result.get("stopped_by")
    if result.get("interrupted") or stopped_by == "interrupt":
        return f"interrupted at step {steps}"
    timed = spec.train.max_minutes is not None
    allowed = ("steps", "max_minutes") if timed else ("steps",)
    if stopped_by is not None and stopped_by not in allowed:
        return f"stopped by {stopped_by} at step {steps}"
    if not isinstance(steps, int) or steps < 1 or steps > spec.train.steps:
        return f"results.json has steps={steps!r}, the run asks for {spec.train.steps}"
    if not timed and steps != spec.train.steps:
        return f"stopped at step {steps} of {spec.train.steps}"
    return None


def _finished_result(run_dir: Path, spec: RunSpec, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The results.json of a finished run of exactly ``payload``; None when it must be trained."""
    if not (run_dir / SPEC_FILE).exists():
        return None
    stored = json.loads((run_dir / SPEC_FILE).read_text())
    if stored != payload:
        # The same name and hash prefix, another spec: never train over it.
        raise GridRunError(
            f"{run_dir / SPEC_FILE}: holds another run ({', '.join(_differing_fields(stored, payload))} "
            "differ); move it away or choose another --out (nothing was overwritten)"
        )
    if not (run_dir / "results.json").exists() or not (run_dir / "checkpoint" / "state.pt").exists():
        return None
    result = json.loads((run_dir / "results.json").read_text())
    return result if incomplete_reason(result, spec) is None else None


def _differing_fields(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    names = []
    for key in sorted(set(stored) | set(expected)):
        a, b = stored.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += [f"{key}.{name}" for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]
        elif a != b:
            names.append(key)
    return names


def _run_one(run_dir: Path, spec: RunSpec, data_sha256: str) -> dict:
    payload = spec.to_dict(data_sha256)
    result = _finished_result(run_dir, spec, payload)
    if result is None:
        if run_dir.exists():
            # This spec's own directory, left unfinished (interrupted, crashed): start again.
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        write_json_atomic(run_dir / SPEC_FILE, payload)
        result = train(spec.model, spec.train, run_dir, progress=False).to_dict()
        if result.get("interrupted") or result.get("stopped_by") == "interrupt":
            raise GridInterrupted(spec.key, run_dir, result.get("stop_signal") or "SIGINT")
        reason = incomplete_reason(result, spec)
        if reason is not None:
            raise GridRunError(f"run {spec.key} ({run_dir}) {reason}; results.md was not written")
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

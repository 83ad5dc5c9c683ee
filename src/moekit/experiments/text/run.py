"""Experiment (h) of ``moekit compare``: natural text with enough data, MoE vs dense.

    moekit compare --experiments h --out runs/compare              # fetches GCIDE once (apt-get download)
    moekit compare --experiments h --gcide-deb dict-gcide_0.48.5+nmu2_all.deb   # offline: the .deb by hand
    moekit compare --experiments h --quick --out /tmp/h            # tiny: checks the pipeline

Experiment (f) showed that on tiny Shakespeare even a dense model with 4x the FFN width gains
nothing: the corpus is seen more than once and the model is not limited by its FFN parameters,
so an MoE's extra parameters have nothing to do. Here the corpus is GCIDE (``data.py``, ~29 MB
of English prose), so that no training byte is seen more than about once at the step budget
(the summary reports tokens seen / training tokens, which must stay below 1), and three
models of one seed train on the same batches in the same order:
- ``dense``: the dense baseline of equal active compute of the MoE (``LMConfig.as_dense()``:
  FFN width k·d_ff + E/3, the router's share), as experiment (a) builds it;
- ``dense-wide``: one dense FFN of the MoE's total expert width E·d_ff (its FFN parameters are
  the MoE's expert parameters; its compute E/k times the dense one's): the ceiling of what the
  MoE's extra parameters can buy at this size and length (Switch Transformer §2, App. D: the
  MoE approaches the dense model of its total size);
- ``moe``: E experts of width d_ff, top-k.

The issue's order: first the ceiling, dense − dense-wide held-out loss for every seed; when its
mean is below ``ceiling_threshold`` (0.04 nats/byte) the MoE cannot show a gain of 0.02 that
stands out from the seed spread, so its runs are skipped and the ceiling is the result;
otherwise the MoE trains and the summary gives MoE − dense per seed and the share of the
ceiling it recovers.

Every model is scored on the same fixed held-out windows (``heldout_batches``: evenly spaced
windows of the corpus's last 10%, the trainer's validation split, never trained on), in nats
per byte (tokens are bytes). Runs are keyed on their full specification (model, train config,
the prepared text's SHA-256) and reused when complete, by the machinery of
``moekit.experiments.compare.run``; ``jobs`` > 1 trains them in worker processes through
``moekit.experiments.facts.run.run_parallel``. Ctrl-C or SIGTERM stops the grid with
``GridInterrupted``; the same command continues.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moekit.config import MoEConfig
from moekit.experiments.compare.run import GridInterrupted, RunSpec, _fixed_steps, _run_one, _sigterm_as_interrupt
from moekit.experiments.facts.run import _mean_sd, run_parallel
from moekit.experiments.text.data import PreparedGcide, prepare_gcide
from moekit.models.lm import LMConfig
from moekit.training.checkpoint import load_model_from_run
from moekit.training.config import TrainConfig
from moekit.training.data import TRAIN_FRACTION, ByteTokenizer, TextDataset, eval_batches
from moekit.training.trainer import evaluate

SEED_OFFSET = 1000  # TrainConfig.seed = 1000 + seed, as the rest of ``moekit compare``
DENSE, WIDE, MOE = "dense", "dense-wide", "moe"


@dataclass(frozen=True)
class TextConfig:
    """Everything experiment (h) trains and measures; the fields enter every run's spec."""

    # Model. NOTE: small (d_model 64, 2 layers): dense-wide runs an FFN of width E·d_ff = 2,048
    # for every token, ~4.4x the dense model's step time (measured under load, one thread), and
    # the whole grid must fit about 30 minutes on 2 cores (the arithmetic is in docs/text.md).
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    seq_len: int = 128
    d_ff: int = 128  # one expert's width (2·d_model)
    num_experts: int = 16  # total/active FFN parameters 8x: the largest ceiling the budget allows
    top_k: int = 2
    balance_loss_coef: float = 0.02
    z_loss_coef: float = 1e-3
    # Training.
    # NOTE: 1,000 steps = 2.05M tokens, 0.079 epochs of GCIDE; ~29 minutes for 3 seeds with
    # --jobs 2 by arithmetic from tokens/s measured under load (docs/text.md).
    steps: int = 1000
    batch_size: int = 16
    lr: float = 4e-3
    warmup_steps: int = 100
    eval_batches: int = 4  # the trainer's own validation (the learning curves), 8 times a run
    # Held-out score: ``heldout_windows`` evenly spaced windows of the validation split.
    heldout_windows: int = 1024
    heldout_batch_size: int = 64
    ceiling_threshold: float = 0.04  # nats/byte: below it the MoE runs are skipped (the issue)
    # The prepared corpus: set by ``run_text`` (not a default: it lives in a cache directory).
    corpus: str = ""
    corpus_sha256: str = ""

    def validate(self) -> None:
        for name in ("d_model", "n_layer", "n_head", "seq_len", "d_ff", "num_experts", "top_k", "steps",
                     "batch_size", "eval_batches", "heldout_windows", "heldout_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TextConfig.{name}={value!r} is invalid: must be an integer >= 1")
        if self.num_experts <= self.top_k:
            raise ValueError(f"TextConfig.num_experts={self.num_experts} is invalid: must be > top_k={self.top_k}")
        if not isinstance(self.ceiling_threshold, (int, float)) or math.isnan(self.ceiling_threshold):
            raise ValueError(f"TextConfig.ceiling_threshold={self.ceiling_threshold!r} is invalid: must be a number")


def default_config(steps: int | None = None, quick: bool = False) -> TextConfig:
    config = TextConfig()
    if quick:
        # Tiny: seconds per run; checks the pipeline, says nothing about MoE vs dense.
        config = replace(
            config, d_model=16, n_layer=1, n_head=2, seq_len=32, d_ff=16, num_experts=4, steps=20, batch_size=4,
            warmup_steps=3, eval_batches=2, heldout_windows=32, heldout_batch_size=16,
        )
    return config if steps is None else replace(config, steps=steps)


def models(config: TextConfig) -> dict[str, LMConfig]:
    """The grid's models by run name: dense, dense-wide, moe (see the module docstring)."""
    moe = LMConfig(
        d_model=config.d_model, n_layer=config.n_layer, n_head=config.n_head, seq_len=config.seq_len,
        moe=MoEConfig(d_model=config.d_model, d_ff=config.d_ff, num_experts=config.num_experts, top_k=config.top_k,
                      balance_loss_coef=config.balance_loss_coef, z_loss_coef=config.z_loss_coef),
    )
    # One "expert" of width E·d_ff taken by every token: matched_d_ff = 1·E·d_ff + 1/3 → E·d_ff.
    wide = replace(moe, moe=replace(moe.moe, d_ff=config.num_experts * config.d_ff, num_experts=1, top_k=1))
    return {DENSE: moe.as_dense(), WIDE: wide.as_dense(), MOE: moe}


def train_config(config: TextConfig, seed: int) -> TrainConfig:
    base = TrainConfig(
        data=config.corpus, batch_size=config.batch_size, lr=config.lr, warmup_steps=config.warmup_steps,
        seed=SEED_OFFSET + seed, device="cpu", eval_batches=config.eval_batches,
    )
    return _fixed_steps(base, config.steps)


def epoch_use(config: TextConfig, corpus_bytes: int) -> dict[str, float]:
    """How much of the training split one run reads: tokens seen / training tokens (an epoch is 1).

    Windows start at random offsets, so a byte is covered a Poisson(r) number of times for
    r = tokens seen / training tokens; the shares seen at least once and more than once follow.
    """
    train_tokens = int(TRAIN_FRACTION * corpus_bytes)  # bytes are tokens; the trainer's split
    seen = config.steps * config.batch_size * config.seq_len
    ratio = seen / train_tokens
    return {
        "tokens_seen": seen,
        "train_tokens": train_tokens,
        "epochs": ratio,
        "share_seen": 1 - math.exp(-ratio),
        "share_seen_twice_or_more": 1 - math.exp(-ratio) * (1 + ratio),
    }


def heldout_batches(dataset: TextDataset, config: TextConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed held-out set: evenly spaced windows of the validation split, the same for every model."""
    return eval_batches(dataset.val_tokens, config.heldout_batch_size, config.seq_len,
                        math.ceil(config.heldout_windows / config.heldout_batch_size))


@dataclass
class TextRun:
    """One trained model's held-out loss (nats per byte) and its training figures."""

    name: str
    seed: int
    heldout_loss: float
    heldout_tokens: int
    train: dict[str, Any] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, the trainer's val loss)


class TextGrid:
    """Trains (or reuses) and evaluates the runs of experiment (h) under ``out``; the interface
    ``run_parallel`` expects (``prepare``, ``run``, ``current``)."""

    def __init__(self, out: Path, config: TextConfig, progress: tqdm | None = None) -> None:
        if not config.corpus or not config.corpus_sha256:
            raise ValueError("TextConfig.corpus and corpus_sha256 must name the prepared corpus (run_text sets them)")
        self.out, self.config, self.progress = out, config, progress
        self.current: RunSpec | None = None
        self.current_dir: Path | None = None
        self._heldout: list | None = None

    def prepare(self, name: str, model: LMConfig, seed: int) -> None:
        """Nothing to write per task: the corpus is prepared once, before the grid."""

    def heldout(self) -> list:
        if self._heldout is None:
            dataset = TextDataset.load(self.config.corpus, self.config.seq_len, ByteTokenizer())
            self._heldout = heldout_batches(dataset, self.config)
        return self._heldout

    def run(self, name: str, model: LMConfig, seed: int) -> TextRun:
        spec = RunSpec(name, seed, model, train_config(self.config, seed))
        run_dir = self.out / "runs" / spec.directory_name(self.config.corpus_sha256)
        self.current, self.current_dir = spec, run_dir
        if self.progress is not None:
            self.progress.set_postfix_str(f"{name} s{seed}")
        torch.manual_seed(spec.train.seed)
        result = _run_one(run_dir, spec, self.config.corpus_sha256)
        trained, _ = load_model_from_run(run_dir)
        batches = self.heldout()
        loss = evaluate(trained, batches, bf16=False, device=torch.device("cpu"))
        self.current = self.current_dir = None
        if self.progress is not None:
            self.progress.update(1)
        keep = ("steps", "train_seconds", "tokens_per_s", "total_params", "active_params", "val_loss",
                "load_imbalance")
        curve = [(row["step"], row["val_loss"]) for row in result["history"] if row.get("val_loss") is not None]
        tokens = sum(inputs.numel() for inputs, _ in batches)
        return TextRun(name, seed, loss, tokens, {k: result.get(k) for k in keep}, curve)


def _train_all(grid: TextGrid, tasks: list[tuple[str, LMConfig, int]], jobs: int, received: list[str]) -> list[TextRun]:
    if jobs == 1:
        return [grid.run(*task) for task in tasks]
    return run_parallel(grid, tasks, jobs, received)


def run_text(
    out: str | Path,
    seeds: int = 3,
    steps: int | None = None,
    quick: bool = False,
    command: str = "moekit compare --experiments h",
    config: TextConfig | None = None,
    jobs: int = 1,
    data_dir: str | Path | None = None,
    gcide_deb: str | Path | None = None,
) -> dict[str, Any]:
    """Prepare the corpus, train the ceiling (dense, dense-wide), then the MoE when the ceiling
    allows; write results_h.md and h_text.png into ``out``; return the summary. Ctrl-C or
    SIGTERM raises ``GridInterrupted``; a corpus that cannot be fetched raises ``GcideUnavailable``."""
    config = config or default_config(steps, quick)
    if steps is not None:
        config = replace(config, steps=steps)
    config.validate()
    if seeds < 1:
        raise ValueError(f"--seeds {seeds} is invalid: must be >= 1")
    if jobs < 1:
        raise ValueError(f"--jobs {jobs} is invalid: must be >= 1")
    corpus = prepare_gcide(Path(data_dir) if data_dir is not None else None,
                           Path(gcide_deb) if gcide_deb is not None else None)
    config = replace(config, corpus=str(corpus.path), corpus_sha256=corpus.sha256)
    use = epoch_use(config, corpus.num_bytes)
    if use["epochs"] >= 1:
        most = int(use["train_tokens"] // (config.batch_size * config.seq_len))
        raise ValueError(
            f"--steps-h {config.steps} is invalid: {config.steps} steps x {config.batch_size} x {config.seq_len} = "
            f"{use['tokens_seen']:,} tokens would repeat the training split ({use['train_tokens']:,} tokens); "
            f"at most {most - 1} steps stay within one epoch"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid_models = models(config)
    started = time.time()
    with _sigterm_as_interrupt() as received, tqdm(total=3 * seeds, desc="compare h", unit="run",
                                                   dynamic_ncols=True) as progress:
        grid = TextGrid(out, config, progress)
        try:
            # The costly dense-wide runs first: with jobs > 1 the cheap dense runs then fill the gaps.
            ceiling_tasks = [(name, grid_models[name], seed) for name in (WIDE, DENSE) for seed in range(seeds)]
            runs = _train_all(grid, ceiling_tasks, jobs, received)
            dense = [r.heldout_loss for r in runs if r.name == DENSE]
            wide = [r.heldout_loss for r in runs if r.name == WIDE]
            if statistics.mean(d - w for d, w in zip(dense, wide, strict=True)) >= config.ceiling_threshold:
                runs += _train_all(grid, [(MOE, grid_models[MOE], seed) for seed in range(seeds)], jobs, received)
            else:
                progress.total = 2 * seeds
                progress.refresh()
            summary = summarize(config, runs, grid_models, corpus, use)
            summary["seconds"] = time.time() - started
            summary["jobs"] = jobs
            from moekit.experiments.text.report import write_text_report

            write_text_report(out, summary, command)
        except GridInterrupted as interrupted:  # the trainer caught the signal and saved the run's checkpoint
            if received[0] != "SIGINT":  # SIGTERM arrived outside the trainer's own handler
                raise GridInterrupted(interrupted.run, interrupted.run_dir, received[0]) from None
            raise
        except KeyboardInterrupt:  # outside a training loop: evaluation, report
            spec = grid.current
            raise GridInterrupted(spec.key if spec else None, grid.current_dir, received[0]) from None
    return summary


def summarize(
    config: TextConfig, runs: list[TextRun], grid_models: dict[str, LMConfig], corpus: PreparedGcide,
    use: dict[str, float],
) -> dict[str, Any]:
    """Per model: held-out loss per seed and mean ± sd; the ceiling (dense − dense-wide) per seed
    and the decision; when the MoE ran, MoE − dense per seed, the share of the ceiling it
    recovers, and the issue's acceptance check."""
    by_name: dict[str, list[TextRun]] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run)
    rows: dict[str, Any] = {}
    for name, model_runs in by_name.items():
        model_runs.sort(key=lambda r: r.seed)
        losses = [r.heldout_loss for r in model_runs]
        mean, sd = _mean_sd(losses)
        rows[name] = {
            "ffn_width": grid_models[name].ffn_width(0),
            "experts": grid_models[name].moe.num_experts if grid_models[name].arch == "moe" else None,
            "total_params": model_runs[0].train["total_params"],
            "active_params": model_runs[0].train["active_params"],
            "seeds": [r.seed for r in model_runs],
            "heldout_loss": losses,
            "heldout_loss_mean": mean,
            "heldout_loss_sd": sd,
            "train_seconds": statistics.mean(r.train["train_seconds"] for r in model_runs),
            "tokens_per_s": statistics.mean(r.train["tokens_per_s"] for r in model_runs),
            "curves": [r.curve for r in model_runs],
        }
    dense, wide = rows[DENSE]["heldout_loss"], rows[WIDE]["heldout_loss"]
    gains = [d - w for d, w in zip(dense, wide, strict=True)]
    ceiling_mean, ceiling_sd = _mean_sd(gains)
    ceiling = {
        "per_seed": gains,
        "mean": ceiling_mean,
        "sd": ceiling_sd,
        "threshold": config.ceiling_threshold,
        "reached": ceiling_mean >= config.ceiling_threshold,
    }
    moe: dict[str, Any] | None = None
    if MOE in rows:
        diffs = [m - d for m, d in zip(rows[MOE]["heldout_loss"], dense, strict=True)]
        margins = [-x for x in diffs]
        moe = {
            "moe_minus_dense": diffs,
            "moe_minus_dense_mean": statistics.mean(diffs),
            # Share of the dense → dense-wide gain the MoE recovers (None without a gain).
            "ceiling_recovered": -statistics.mean(diffs) / ceiling_mean if ceiling_mean > 0 else None,
            "beats_dense_by_0.02_all_seeds_positive": statistics.mean(margins) >= 0.02 and all(m > 0 for m in margins),
        }
    return {
        "config": asdict(config),
        "corpus": {"path": str(corpus.path), "sha256": corpus.sha256, "bytes": corpus.num_bytes,
                   "heldout_tokens": runs[0].heldout_tokens},
        "epoch_use": use,
        "models": rows,
        "ceiling": ceiling,
        "moe": moe,
        "steps": config.steps,
        "seeds": len(dense),
    }

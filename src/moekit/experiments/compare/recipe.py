"""Experiment (i) of ``moekit compare``: what each part of the MoE recipe does to the seed spread.

``moekit train``'s defaults are the literature's stable MoE recipe: the router initialized at a
scaled-down std (``LMConfig.router_init_std`` 0.02; Switch §2.4 scales initialization to
variance 0.1/fan_in), its logits computed in float32 (``Router.compute_logits``, also under
autocast), a z-loss (ST-MoE, coefficient 1e-3), a balance loss (Switch, 0.02) and validation on
a fixed set of windows (``training.data.eval_batches``). Each setting here turns one of them
back to the naive choice, at the side experiments' shape (context 64, batch 8), and trains
``RECIPE_SEEDS`` seeds, so the spread of its validation loss over seeds can be set against the
recipe's and the dense baseline's:

  moe-top2         the recipe (shared with (b)-(e))
  router-init-1x   the router at Switch's unscaled init, std sqrt(1/d_model) (0.088 at d 128)
  no-z-loss        z-loss coefficient 0
  no-balance-loss  balance-loss coefficient 0 (shared with (d))
  dense-top2       the dense baseline of equal active compute: the spread to compare with

The fixed evaluation set is not a training setting: its share of the spread is measured on the
trained recipe runs themselves, by evaluating each on ``EVAL_DRAWS`` sets of random validation
windows of the same size (what a loop that validates on random batches reports) and taking the
standard deviation over draws. The float32 router has no CPU ablation: training on CPU runs in
float32, where the gate is float32 either way (bit for bit); under ``--bf16`` autocast it is kept
float32 (tests/test_routing.py).

With 5 seeds a ratio of two standard deviations is only distinguishable from chance when it is
beyond about 3.1 (the two-sided 5% F test, F(4, 4) = 9.60): the table says which are.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch

from moekit.training.checkpoint import load_model_from_run
from moekit.training.data import ByteTokenizer, TextDataset, eval_batches, random_batch
from moekit.training.trainer import evaluate

RECIPE = "moe-top2"
DENSE = "dense-top2"
RECIPE_SETTINGS = (RECIPE, "router-init-1x", "no-z-loss", "no-balance-loss", DENSE)
RECIPE_SEEDS = 5
RECIPE_SEEDS_QUICK = 2
EVAL_DRAWS = 5

# Upper 2.5% points of F(d, d) (two-sided 5% test of equal variances with d + 1 samples each),
# from the F distribution's tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.3).
F_TWO_SIDED_5PCT = {1: 647.79, 2: 39.00, 3: 15.44, 4: 9.60, 5: 7.15, 6: 5.82, 7: 4.99, 8: 4.43, 9: 4.03}


def eval_draw_spread(runs: list[tuple[int, Path]], draws: int = EVAL_DRAWS, seed: int = 0) -> dict[str, Any]:
    """Per run (its seed, its directory): its validation loss on the fixed windows the trainer
    uses and on ``draws`` sets of random validation windows of the same size; the spread over
    draws is what a loop that validates on random batches would add to the spread over seeds."""
    rows = []
    for run_seed, run_dir in runs:
        model, payload = load_model_from_run(run_dir)
        train = payload["train"]
        seq_len = model.config.seq_len
        dataset = TextDataset.load(train["data"], seq_len, ByteTokenizer())
        fixed = eval_batches(dataset.val_tokens, train["batch_size"], seq_len, train["eval_batches"])
        generator = torch.Generator().manual_seed(seed)
        random_losses = []
        for _ in range(draws):
            batches = [random_batch(dataset.val_tokens, inputs.shape[0], seq_len, generator) for inputs, _ in fixed]
            random_losses.append(evaluate(model, batches, bf16=False))
        rows.append({
            "seed": run_seed,
            "run": run_dir.name,
            "fixed": evaluate(model, fixed, bf16=False),
            "random": random_losses,
            "random_sd": statistics.stdev(random_losses) if draws > 1 else 0.0,
        })
    return {
        "draws": draws,
        "runs": rows,
        "random_sd_mean": statistics.mean(r["random_sd"] for r in rows),
    }


def sd_ratio_test(sd: float, reference_sd: float, seeds: int) -> dict[str, Any]:
    """sd / reference_sd and whether the two-sided 5% F test tells them apart (None when the
    table has no entry for ``seeds`` - 1 degrees of freedom, or a sd is 0)."""
    ratio = sd / reference_sd if reference_sd > 0 else math.inf
    critical = F_TWO_SIDED_5PCT.get(seeds - 1)
    significant = None
    if critical is not None and sd > 0 and reference_sd > 0:
        f = max(ratio, 1 / ratio) ** 2
        significant = f > critical
    return {"ratio": ratio, "significant": significant, "critical_ratio": math.sqrt(critical) if critical else None}


def summarize_recipe(results: dict[str, list[dict]], eval_spread: dict[str, Any] | None) -> dict[str, Any]:
    """Per setting: per-seed validation losses, mean, sd, and the sd's ratio to the recipe's
    and to the dense baseline's, with the F test's verdict; the evaluation draws' spread."""
    rows: dict[str, Any] = {}
    for name in RECIPE_SETTINGS:
        runs = sorted(results.get(name, []), key=lambda r: r["seed"])
        values = [r["val_loss"] for r in runs]
        rows[name] = {
            "val_losses": values,
            "seeds": [r["seed"] for r in runs],
            "mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "load_imbalance": statistics.mean(r["load_imbalance"] for r in runs)
            if all(r.get("load_imbalance") is not None for r in runs) else None,
        }
    seeds = len(rows[RECIPE]["val_losses"])
    for row in rows.values():
        row["vs_recipe"] = sd_ratio_test(row["sd"], rows[RECIPE]["sd"], seeds)
        row["vs_dense"] = sd_ratio_test(row["sd"], rows[DENSE]["sd"], seeds)
        # Paired by seed (the same data order): the setting's effect on the loss itself.
        diffs = [v - r for v, r in zip(row["val_losses"], rows[RECIPE]["val_losses"], strict=True)]
        row["diff_vs_recipe"] = diffs
        row["diff_vs_recipe_mean"] = statistics.mean(diffs)
        row["diff_vs_recipe_same_sign"] = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return {"settings": rows, "seeds": seeds, "eval_draws": eval_spread}

"""results.md and the PNG figures of ``moekit compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _loss(summary: dict, name: str) -> str:
    row = summary[name]
    if row["seeds"] == 1:
        return f"{row['val_loss_mean']:.4f}"
    return f"{row['val_loss_mean']:.4f} ± {row['val_loss_sd']:.4f}"


def _mean_curve(runs: list[dict], key: str, x_key: str = "step") -> tuple[np.ndarray, np.ndarray]:
    curves = []
    for run in runs:
        points = [(row[x_key], row[key]) for row in run["history"] if row.get(key) is not None]
        curves.append(points)
    length = min(len(c) for c in curves)
    xs = np.array([[p[0] for p in c[:length]] for c in curves]).mean(axis=0)
    ys = np.array([[p[1] for p in c[:length]] for c in curves]).mean(axis=0)
    return xs, ys


def write_report(
    out: Path,
    experiments: list[str],
    results: dict[str, list[dict]],
    summary: dict[str, Any],
    command: str,
    seconds: float,
    steps: int,
    seeds: int,
    headline_steps: int,
) -> Path:
    lines = [
        "# moekit compare: results",
        "",
        f"Made by `{command}` in {seconds / 60:.1f} minutes on {_machine()}. Experiment (a) trains "
        f"the default `moekit train` model and recipe (context 128, batch 16) for {headline_steps} steps "
        f"with {seeds} seed(s), and so does (f); (b)-(e) train the same model at context 64 and batch 8 "
        f"for {steps} steps "
        "with up to 2 seeds. Validation loss is cross-entropy in nats per token (bytes) on the fixed "
        "10% split, mean ± sd over seeds.",
        "",
    ]
    figures: list[str] = []
    if "a" in experiments:
        moe, dense, timed = summary["moe"], summary["dense"], summary["dense-equal-time"]
        throughput = summary["throughput"]
        gap = dense["val_loss_mean"] - moe["val_loss_mean"]
        spread = max(moe["val_loss_range"], dense["val_loss_range"])
        verdict = "beats the dense baseline by more than" if gap > spread else "does NOT beat it by more than"
        lines += [
            "## (a) MoE vs the dense baseline of equal active compute",
            "",
            "| model | total params | active params | steps | val loss | tokens/s | train min |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, label in (("moe", "MoE top-2"), ("dense", "dense, equal steps"),
                            ("dense-equal-time", "dense, equal wall time")):
            row = summary[name]
            lines.append(
                f"| {label} | {row['total_params']:,} | {row['active_params']:,} | {row['steps']:.0f} | "
                f"{_loss(summary, name)} | {row['tokens_per_s']:,.0f} | {row['train_seconds'] / 60:.2f} |"
            )
        lines += [
            "",
            f"At equal steps the MoE's validation loss is {'lower' if gap > 0 else 'higher'} than the "
            f"dense baseline's by {abs(gap):.4f} nats; the largest spread (max − min) across seeds of "
            f"either model is {spread:.4f}, so the MoE "
            f"{verdict} the seed spread. At equal wall time the dense baseline reaches "
            f"{timed['val_loss_mean']:.4f} "
            f"({'worse' if timed['val_loss_mean'] > moe['val_loss_mean'] else 'better'} than the MoE).",
            "",
            f"Training throughput measured in one process, the two models alternating for "
            f"{throughput['rounds']} rounds of {throughput['steps_per_round']} optimizer steps (median): "
            f"MoE {throughput['tokens_per_s']['moe']:,.0f} tokens/s, dense "
            f"{throughput['tokens_per_s']['dense']:,.0f} tokens/s: the MoE runs at "
            f"**{throughput['ratio_to_baseline']['moe']:.2f}x** the dense baseline's throughput "
            "(the tokens/s column above comes from separate runs, minutes apart).",
            "",
        ]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, label in (("moe", "MoE top-2"), ("dense", "dense (equal steps)"),
                            ("dense-equal-time", "dense (equal time)")):
            xs, ys = _mean_curve(results[name], "val_loss")
            if name != "dense-equal-time":
                axes[0].plot(xs, ys, "o-", label=label)
            xs, ys = _mean_curve(results[name], "val_loss", "train_seconds")
            axes[1].plot(xs / 60, ys, "o-", label=label)
        axes[0].set_xlabel("step")
        axes[1].set_xlabel("training minutes")
        for ax in axes:
            ax.set_ylabel("validation loss")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle("MoE vs dense at equal active compute")
        figures.append(_save(fig, out / "a_moe_vs_dense.png"))
        lines += ["![MoE vs dense](a_moe_vs_dense.png)", ""]
    if "f" in experiments:
        lines += _ffn_width_section(summary, results)
        figures.append(_ffn_width_figure(summary, out / "f_ffn_width.png"))
        lines += ["![FFN width](f_ffn_width.png)", ""]
    if "b" in experiments:
        lines += [
            "## (b) top-1 (Switch) vs top-2",
            "",
            "| routing | val loss | tokens/s | max/mean load |",
            "|---|---|---|---|",
        ]
        for name, label in (("switch-top1", "Switch top-1"), ("moe-top2", "top-2")):
            row = summary[name]
            lines.append(
                f"| {label} | {_loss(summary, name)} | {row['tokens_per_s']:,.0f} | {_fmt(row['load_imbalance'], 2)} |"
            )
        lines.append("")
    if "c" in experiments:
        names = [("capacity-1.0", "1.0"), ("capacity-1.25", "1.25"), ("capacity-2.0", "2.0"), ("moe-top2", "dropless")]
        lines += [
            "## (c) capacity factor",
            "",
            "| capacity factor | dropped fraction | val loss | tokens/s |",
            "|---|---|---|---|",
        ]
        for name, label in names:
            row = summary[name]
            lines.append(
                f"| {label} | {_fmt(row['dropped_fraction'], 4)} | {_loss(summary, name)} "
                f"| {row['tokens_per_s']:,.0f} |"
            )
        lines += ["", "![capacity](c_capacity.png)", ""]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        labels = [label for _, label in names]
        axes[0].bar(labels, [summary[n]["dropped_fraction"] or 0.0 for n, _ in names])
        axes[0].set_ylabel("dropped fraction (end of training)")
        axes[1].bar(labels, [summary[n]["val_loss_mean"] for n, _ in names],
                    yerr=[summary[n]["val_loss_sd"] for n, _ in names])
        low = min(summary[n]["val_loss_mean"] for n, _ in names)
        axes[1].set_ylim(low - 0.05, None)
        axes[1].set_ylabel("validation loss")
        for ax in axes:
            ax.set_xlabel("capacity factor")
        figures.append(_save(fig, out / "c_capacity.png"))
    if "d" in experiments:
        on, off = summary["moe-top2"], summary["no-balance-loss"]
        lines += [
            "## (d) balance loss on vs off",
            "",
            "| balance loss | max/mean tokens per expert (end) | val loss |",
            "|---|---|---|",
            f"| on (coef {_balance_coef()}) | {_fmt(on['load_imbalance'], 2)} | {_loss(summary, 'moe-top2')} |",
            f"| off | {_fmt(off['load_imbalance'], 2)} | {_loss(summary, 'no-balance-loss')} |",
            "",
            "![balance](d_balance.png)",
            "",
        ]
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, label in (("moe-top2", "balance loss on"), ("no-balance-loss", "balance loss off")):
            xs, ys = _mean_curve(results[name], "load_imbalance")
            ax.plot(xs, ys, label=label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("max / mean tokens per expert (mean over layers)")
        ax.grid(alpha=0.3)
        ax.legend()
        figures.append(_save(fig, out / "d_balance.png"))
    if "e" in experiments:
        names = [("moe-top2", "topk (k=2)"), ("switch-top1", "switch (k=1)"), ("gshard", "gshard (cf 2.0)"),
                 ("noisy-topk", "noisy_topk (k=2)"), ("expert-choice", "expert_choice (cf 1.0)"),
                 ("aux-free", "aux_free (k=2, no aux loss)")]
        lines += [
            "## (e) routers side by side",
            "",
            "| router | val loss | tokens/s | max/mean load | dropped |",
            "|---|---|---|---|---|",
        ]
        for name, label in names:
            row = summary[name]
            lines.append(
                f"| {label} | {_loss(summary, name)} | {row['tokens_per_s']:,.0f} | "
                f"{_fmt(row['load_imbalance'], 2)} | {_fmt(row['dropped_fraction'], 3)} |"
            )
        lines += ["", "![routers](e_routers.png)", ""]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar([label for _, label in names], [summary[n]["val_loss_mean"] for n, _ in names],
               yerr=[summary[n]["val_loss_sd"] for n, _ in names])
        ax.set_ylim(min(summary[n]["val_loss_mean"] for n, _ in names) - 0.05, None)
        ax.set_ylabel("validation loss")
        ax.tick_params(axis="x", rotation=20)
        figures.append(_save(fig, out / "e_routers.png"))
    if "i" in experiments:
        lines += _recipe_section(summary["recipe"])
        figures.append(_recipe_figure(summary["recipe"], out / "i_recipe.png"))
    path = out / "results.md"
    # NOTE: written last and renamed into place: an interrupt never leaves half a report.
    partial = out / "results.md.partial"
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(path)
    return path


RECIPE_ROWS = (
    ("moe-top2", "the recipe: router init std 0.02, z-loss 1e-3, balance 0.02"),
    ("router-init-1x", "router init at fan-in scale, std 1/sqrt(d_model)"),
    ("no-z-loss", "no z-loss"),
    ("no-balance-loss", "no balance loss"),
    ("dense-top2", "dense baseline (equal active compute)"),
)


def _sd_cell(test: dict[str, Any]) -> str:
    verdict = {True: "differs", False: "within chance", None: "-"}[test["significant"]]
    return f"{test['ratio']:.2f} ({verdict})"


def _recipe_section(recipe: dict[str, Any]) -> list[str]:
    settings, seeds = recipe["settings"], recipe["seeds"]
    critical = settings["moe-top2"]["vs_dense"]["critical_ratio"]
    lines = [
        "## (i) the recipe, part by part: the seed spread",
        "",
        f"The (b)-(e) shape with one part of `moekit train`'s MoE recipe turned back to the naive choice "
        f"per row, {seeds} seeds each (the same {seeds} data orders for every row). sd ratio: the row's "
        "standard deviation over seeds divided by the recipe's or the dense baseline's; two-sided 5% F test"
        + (f" (with {seeds} seeds each, only ratios beyond {critical:.2f} or below {1 / critical:.2f} differ "
           "from chance)." if critical else "."),
        "",
        "| setting | val loss | sd | per seed | Δ vs the recipe, mean (same sign in every seed?) | "
        "sd / recipe's | sd / dense's | max/mean load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in RECIPE_ROWS:
        row = settings[name]
        per_seed = " / ".join(f"{v:.3f}" for v in row["val_losses"])
        diff = "-" if name == "moe-top2" else (
            f"{row['diff_vs_recipe_mean']:+.4f} ({'yes' if row['diff_vs_recipe_same_sign'] else 'no'})")
        lines.append(
            f"| {label} | {row['mean']:.4f} | {row['sd']:.4f} | {per_seed} | {diff} | {_sd_cell(row['vs_recipe'])} | "
            f"{_sd_cell(row['vs_dense'])} | {_fmt(row['load_imbalance'], 2)} |"
        )
    draws = recipe.get("eval_draws")
    if draws:
        fixed = [r["fixed"] for r in draws["runs"]]
        lines += [
            "",
            f"The fixed evaluation set: each recipe run evaluated on {draws['draws']} draws of random "
            "validation windows, as many as the fixed set has, gives losses whose sd over draws is "
            f"{draws['random_sd_mean']:.4f} (mean over the {len(fixed)} runs); that is the noise a loop that "
            "validates on random batches would add to every run's figure, against the recipe's sd over seeds "
            f"of {settings['moe-top2']['sd']:.4f} on the fixed set.",
        ]
    lines += [
        "",
        "The float32 router has no row: training on CPU is float32, where the gate is float32 either way; "
        "under `--bf16` autocast the router keeps float32 logits.",
        "",
        "![recipe](i_recipe.png)",
        "",
    ]
    return lines


def _recipe_figure(recipe: dict[str, Any], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(8, 4))
    settings = recipe["settings"]
    for x, (name, _) in enumerate(RECIPE_ROWS):
        values = settings[name]["val_losses"]
        ax.scatter([x] * len(values), values, s=18, alpha=0.7)
        ax.errorbar(x + 0.15, settings[name]["mean"], yerr=settings[name]["sd"], fmt="k_", capsize=4)
    ax.set_xticks(range(len(RECIPE_ROWS)), [name for name, _ in RECIPE_ROWS], rotation=15)
    ax.set_ylabel("validation loss per seed (mean ± sd)")
    ax.grid(alpha=0.3)
    fig.suptitle("The MoE recipe, part by part: spread over seeds")
    return _save(fig, path)


FFN_WIDTH_ROWS = (("dense", "dense, matched width (1x)"), ("dense-ffn-2x", "dense, 2x FFN width"),
                  ("dense-ffn-4x", "dense, 4x FFN width"), ("moe", "MoE top-2 (for reference)"))


def _ffn_width_section(summary: dict[str, Any], results: dict[str, list[dict]]) -> list[str]:
    """Experiment (f): the dense baseline with wider FFNs, as a control for (a)."""
    lines = [
        "## (f) control: does FFN capacity limit this model?",
        "",
        "The dense baseline with 2x and 4x its FFN width (more parameters *and* more compute), same "
        "recipe and steps as (a). An MoE adds FFN parameters without adding compute, so it can only "
        "gain where extra FFN parameters help.",
        "",
        "| model | total params | active params | val loss | per seed |",
        "|---|---|---|---|---|",
    ]
    for name, label in FFN_WIDTH_ROWS:
        row = summary[name]
        per_seed = " / ".join(f"{v:.3f}" for v in row["val_losses"])
        lines.append(
            f"| {label} | {row['total_params']:,} | {row['active_params']:,} | {_loss(summary, name)} | {per_seed} |"
        )
    base = summary["dense"]
    lines.append("")
    for name in ("dense-ffn-2x", "dense-ffn-4x"):
        wide = summary[name]
        gain = base["val_loss_mean"] - wide["val_loss_mean"]
        spread = max(base["val_loss_range"], wide["val_loss_range"])
        verdict = "more than" if gain > spread else "not more than"
        lines.append(
            f"- {name.removeprefix('dense-ffn-')} width: validation loss {'lower' if gain > 0 else 'higher'} "
            f"than the matched dense model's by {abs(gain):.4f} nats, {verdict} the seed spread "
            f"({spread:.4f}), with {wide['active_params'] / base['active_params']:.2f}x the active parameters."
        )
    lines.append("")
    return lines


def _ffn_width_figure(summary: dict[str, Any], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in FFN_WIDTH_ROWS:
        row = summary[name]
        marker = "s" if name == "moe" else "o"
        ax.errorbar(row["active_params"], row["val_loss_mean"], yerr=row["val_loss_sd"], fmt=marker,
                    capsize=4, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("active parameters per token")
    ax.set_ylabel("validation loss (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("Wider dense FFNs vs the MoE, equal steps")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _machine() -> str:
    import os
    import platform

    import torch

    from moekit.experiments.bench.layer import cpu_model_name

    # The CPU model, not just the architecture: ratios differ between CPUs of one architecture.
    return f"{cpu_model_name()} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__}"


def _balance_coef() -> float:
    from moekit.training.config import default_configs

    return default_configs()[0].moe.balance_loss_coef
